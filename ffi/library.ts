/**
 * Finds and opens libswitchyard once per process, and checks that it speaks this binding's ABI.
 *
 * Where it looks, in order:
 * 1. `SWITCHYARD_LIBRARY`: the full path of a build (read only when `--allow-env` grants it);
 * 2. `build/libswitchyard.so` next to this package (what `deno task build` produces), when the
 *    package runs from a local checkout;
 * 3. the per-user cache (`native_cache.ts`), where the package's builder puts the library of a
 *    package imported from JSR or another URL: `deno run -A jsr:@switchyard/ep/build`.
 *
 * The library is never closed: native worker threads may still be inside it.
 *
 * @module
 */

import { cachedLibraries, cacheRoot, grantedEnv } from "./native_cache.ts";
import { ALL_STRUCTS } from "./structs.ts";
import { ABI_VERSION, type Symbols, symbols } from "./symbols.ts";

/** The environment variable that points at a specific build of the library. */
export const LIBRARY_ENV = "SWITCHYARD_LIBRARY";

/** Why the library could not be used. */
export interface LoadFailure {
  /** `LIBRARY_NOT_FOUND` or `ABI_MISMATCH`. */
  readonly code: "LIBRARY_NOT_FOUND" | "ABI_MISMATCH";
  /** What went wrong, with the remedy. */
  readonly message: string;
  /** Every path tried, with the loader's answer. */
  readonly tried: readonly string[];
}

/** The opened library, or why there is none. */
export type LoadResult =
  | { readonly ok: true; readonly symbols: Symbols; readonly path: string }
  | { readonly ok: false; readonly failure: LoadFailure };

let cached: LoadResult | undefined;

/** The paths the loader tries, in order. */
export function candidatePaths(): string[] {
  const override = grantedEnv(LIBRARY_ENV);
  if (override) return [override];
  const paths: string[] = [];
  const local = new URL("../build/libswitchyard.so", import.meta.url);
  if (local.protocol === "file:") paths.push(decodeURIComponent(local.pathname));
  const cache = cacheRoot();
  if ("dir" in cache) paths.push(...cachedLibraries(cache.dir));
  return paths;
}

/** How to get a library, for this package as it was imported. */
export function buildInstruction(): string {
  const here = new URL(import.meta.url);
  if (here.protocol === "file:" && exists(new URL("../scripts/build.ts", here))) {
    return "build it with 'deno task build' (in the checkout)";
  }
  const builder = here.hostname === "jsr.io" ? "jsr:@switchyard/ep/build" : new URL("../src/cli/build.ts", here).href;
  return `build it once with 'deno run -A ${builder}' (CMake >= 3.24 and a C++20 compiler; nvcc for the CUDA ` +
    "kernels)";
}

function exists(url: URL): boolean {
  try {
    Deno.statSync(url);
    return true;
  } catch {
    return false;
  }
}

function checkAbi(lib: Symbols, path: string): LoadFailure | undefined {
  const abi = lib.sy_abi_version();
  if (abi !== ABI_VERSION) {
    return {
      code: "ABI_MISMATCH",
      message: `${path} speaks ABI ${abi}, this binding ABI ${ABI_VERSION}; ${buildInstruction()}, or point ` +
        `${LIBRARY_ENV} at a matching build`,
      tried: [path],
    };
  }
  const sizes = new Uint32Array(ALL_STRUCTS.length);
  lib.sy_struct_sizes(sizes, sizes.length);
  for (let i = 0; i < ALL_STRUCTS.length; i++) {
    if (sizes[i] !== ALL_STRUCTS[i].size) {
      return {
        code: "ABI_MISMATCH",
        message: `${path}: ${ALL_STRUCTS[i].name} is ${sizes[i]} bytes in the library but ` +
          `${ALL_STRUCTS[i].size} in this binding; ${buildInstruction()}`,
        tried: [path],
      };
    }
  }
  return undefined;
}

const capitalized = (s: string) => s[0].toUpperCase() + s.slice(1);

function cacheNote(): string {
  const cache = cacheRoot();
  return "why" in cache ? ` (the build cache was not searched: ${cache.why})` : "";
}

/**
 * Why the library at `path` cannot serve this binding (it does not open, or speaks another ABI),
 * or undefined when it can. The library is closed again: for a build about to be installed.
 */
export function checkLibraryFile(path: string): string | undefined {
  let lib: Deno.DynamicLibrary<typeof symbols>;
  try {
    lib = Deno.dlopen(path, symbols);
  } catch (e) {
    return `${path}: ${e instanceof Error ? e.message : e}`;
  }
  try {
    return checkAbi(lib.symbols, path)?.message;
  } finally {
    lib.close();
  }
}

/** Opens the library on first use; later calls return the same result. */
export function loadLibrary(): LoadResult {
  if (cached) return cached;
  const tried: string[] = [];
  for (const path of candidatePaths()) {
    let lib: Deno.DynamicLibrary<typeof symbols>;
    try {
      lib = Deno.dlopen(path, symbols);
    } catch (e) {
      if (e instanceof Deno.errors.NotCapable) throw e;
      const why = (e instanceof Error ? e.message : String(e)).replace(/^(Could not open library: )+/, "");
      tried.push(`${path} (${why})`);
      continue;
    }
    const bad = checkAbi(lib.symbols, path);
    if (bad) {
      cached = { ok: false, failure: bad };
      return cached;
    }
    cached = { ok: true, symbols: lib.symbols, path };
    return cached;
  }
  cached = {
    ok: false,
    failure: {
      code: "LIBRARY_NOT_FOUND",
      message: `libswitchyard not found; tried: ${tried.join("; ") || "nothing"}${cacheNote()}. ` +
        `${capitalized(buildInstruction())}, or set ${LIBRARY_ENV} to the full path of libswitchyard.so`,
      tried,
    },
  };
  return cached;
}
