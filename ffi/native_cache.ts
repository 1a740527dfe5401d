/**
 * Where built libraries are kept for packages imported from JSR (or any remote URL), which
 * carry the sources but no build: one directory per package version and ABI, one build per
 * target inside it.
 *
 *     $SWITCHYARD_CACHE_DIR                (else $XDG_CACHE_HOME/switchyard, else ~/.cache/switchyard)
 *       0.1.0-abi4/
 *         host/libswitchyard.so            the host backend only (no GPU or no nvcc when built)
 *         sm_90/libswitchyard.so           with CUDA kernels for that architecture
 *
 * The builder (`src/cli/build.ts`) writes them; the loader (`library.ts`) reads them. Both only
 * read environment variables they were granted, so nothing prompts.
 *
 * @module
 */

import { PACKAGE_VERSION } from "./native_sources.ts";
import { ABI_VERSION } from "./symbols.ts";

/** Overrides the cache's root directory. */
export const CACHE_ENV = "SWITCHYARD_CACHE_DIR";
/** Chooses one cached build target (`host`, `sm_90`, ...) instead of the loader's preference. */
export const TARGET_ENV = "SWITCHYARD_TARGET";

/** The file name of the library in a build directory and in the cache. */
export const LIBRARY_FILE = "libswitchyard.so";

/** An environment variable's value, read only when `--allow-env` grants it (so nothing prompts). */
export function grantedEnv(name: string): string | undefined {
  return Deno.permissions.querySync({ name: "env", variable: name }).state === "granted"
    ? Deno.env.get(name) || undefined
    : undefined;
}

/** The cache's root directory, or why there is none (an environment variable not granted). */
export function cacheRoot(): { dir: string } | { why: string } {
  const explicit = grantedEnv(CACHE_ENV);
  if (explicit) return { dir: explicit };
  const xdg = grantedEnv("XDG_CACHE_HOME");
  if (xdg) return { dir: `${xdg}/switchyard` };
  const home = grantedEnv("HOME");
  if (home) return { dir: `${home}/.cache/switchyard` };
  return { why: `no ${CACHE_ENV}, XDG_CACHE_HOME or HOME (unset, or --allow-env does not grant it)` };
}

/** This package's directory in the cache: builds of this version and ABI only. */
export function versionDir(root: string): string {
  return `${root}/${PACKAGE_VERSION}-abi${ABI_VERSION}`;
}

/** Whether an NVIDIA GPU is visible (its driver lists one); false where that cannot be read. */
export function gpuVisible(): boolean {
  try {
    for (const _ of Deno.readDirSync("/proc/driver/nvidia/gpus")) return true;
  } catch {
    // no driver, or no read permission
  }
  return false;
}

/**
 * The cached builds to try, best first: the one `SWITCHYARD_TARGET` names; else, where a GPU
 * is visible, CUDA builds (newest architecture first) before the host build, and the reverse
 * where none is.
 */
export function cachedLibraries(root: string): string[] {
  const dir = versionDir(root);
  const chosen = grantedEnv(TARGET_ENV);
  if (chosen) return [`${dir}/${chosen}/${LIBRARY_FILE}`];
  let targets: string[] = [];
  try {
    targets = [...Deno.readDirSync(dir)].filter((e) => e.isDirectory && e.name !== "src").map((e) => e.name);
  } catch {
    return [`${dir}/host/${LIBRARY_FILE}`]; // nothing built yet: where the host build would be
  }
  const arch = (t: string) => Number(t.match(/^sm_(\d+)/)?.[1] ?? 0);
  const cuda = targets.filter((t) => t.startsWith("sm_")).sort((a, b) => arch(b) - arch(a));
  const host = targets.filter((t) => t === "host");
  return (gpuVisible() ? [...cuda, ...host] : [...host, ...cuda]).map((t) => `${dir}/${t}/${LIBRARY_FILE}`);
}
