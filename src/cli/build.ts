/**
 * Builds the native library of this package into the per-user cache, where the loader finds it
 * (`ffi/native_cache.ts`). For a package imported from JSR or another URL, which ships the
 * sources (CMakeLists.txt and csrc/) but no build:
 *
 *     deno run -A jsr:@switchyard/ep/build [--cuda auto|on|off] [--arch 90] [--jobs N]
 *
 * The sources are fetched next to this module (the list is `ffi/native_sources.ts`), configured
 * with CMake and built (the library target only), then the library is checked for this
 * package's ABI and moved into place. `--cuda auto` (the default) compiles the CUDA kernels
 * where a GPU is visible and nvcc is on PATH, for the GPU's architecture (nvidia-smi) unless
 * `--arch` says otherwise; otherwise the host backend alone. Needs CMake >= 3.24 and a C++20
 * compiler. From a checkout, `deno task build` is the usual way; this works there too.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { checkLibraryFile } from "../../ffi/library.ts";
import { CACHE_ENV, cacheRoot, gpuVisible, LIBRARY_FILE, versionDir } from "../../ffi/native_cache.ts";
import { NATIVE_SOURCES, PACKAGE_VERSION } from "../../ffi/native_sources.ts";
import { ABI_VERSION } from "../../ffi/symbols.ts";

/** The largest source file the builder accepts from the package's host. */
export const MAX_SOURCE_BYTES = 4 << 20;

/** Runs a command with inherited output; throws naming it when it fails or is not installed. */
export async function runCommand(cmd: string[]): Promise<void> {
  let child;
  try {
    child = new Deno.Command(cmd[0], { args: cmd.slice(1), stdout: "inherit", stderr: "inherit" }).spawn();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new Error(`'${cmd[0]}' is not installed; the library needs CMake >= 3.24 and a C++20 compiler`);
    }
    throw e;
  }
  const { code } = await child.status;
  if (code !== 0) throw new Error(`'${cmd.join(" ")}' failed with exit code ${code}`);
}

async function output(cmd: string, args: string[]): Promise<string | undefined> {
  try {
    const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "null" }).output();
    return out.success ? new TextDecoder().decode(out.stdout).trim() : undefined;
  } catch {
    return undefined;
  }
}

/** Copies the package's native sources from `base` (a URL ending in /) into `dir`. */
async function fetchSources(base: URL, dir: string): Promise<void> {
  const partial = `${dir}.partial-${Deno.pid}`;
  await Deno.remove(partial, { recursive: true }).catch(() => {});
  for (const path of NATIVE_SOURCES) {
    if (path.split("/").some((part) => part === ".." || part === "")) throw new Error(`bad source path ${path}`);
    const url = new URL(path, base);
    const response = await fetch(url);
    if (!response.ok) {
      await response.body?.cancel();
      throw new Error(`fetching ${url}: HTTP ${response.status}`);
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    if (bytes.length > MAX_SOURCE_BYTES) throw new Error(`${url}: ${bytes.length} bytes, over ${MAX_SOURCE_BYTES}`);
    const file = `${partial}/${path}`;
    await Deno.mkdir(file.slice(0, file.lastIndexOf("/")), { recursive: true });
    await Deno.writeFile(file, bytes);
  }
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  await Deno.rename(partial, dir);
}

/** The architecture of the first visible GPU as CMake spells it (`90`), if nvidia-smi says. */
async function gpuArchitecture(): Promise<string | undefined> {
  const cap = await output("nvidia-smi", ["--query-gpu=compute_cap", "--format=csv,noheader"]);
  const m = cap?.split("\n")[0].match(/^(\d+)\.(\d+)$/);
  return m ? `${m[1]}${m[2]}` : undefined;
}

/** Builds the library into the cache; returns its path. */
export async function buildIntoCache(options: { cuda?: string; arch?: string; jobs?: number } = {}): Promise<string> {
  const root = cacheRoot();
  if ("why" in root) throw new Error(`no cache directory: ${root.why}; set ${CACHE_ENV}`);
  const home = versionDir(root.dir);
  const base = new URL("../../", import.meta.url);
  let sources: string;
  if (base.protocol === "file:") {
    sources = decodeURIComponent(base.pathname).replace(/\/$/, "");
  } else {
    sources = `${home}/src`;
    console.log(`switchyard: fetching ${NATIVE_SOURCES.length} source files from ${base.href}`);
    await fetchSources(base, sources);
  }

  const mode = (options.cuda ?? Deno.env.get("SWITCHYARD_CUDA") ?? "auto").toLowerCase();
  if (!["auto", "on", "off"].includes(mode)) throw new Error(`--cuda: expected auto, on or off, got ${mode}`);
  const nvcc = (await output("nvcc", ["--version"])) !== undefined;
  const cuda = mode === "on" || (mode === "auto" && nvcc && gpuVisible());
  let arch = options.arch ?? Deno.env.get("SWITCHYARD_CUDA_ARCHITECTURES") ?? "";
  if (cuda && !arch) arch = (await gpuArchitecture()) ?? "90";
  const target = cuda ? `sm_${arch.split(";").join("_")}` : "host";
  const build = `${home}/${target}/build`;
  console.log(
    `switchyard ${PACKAGE_VERSION} (ABI ${ABI_VERSION}): building the ${
      cuda ? `CUDA backend for sm_${arch}` : "host backend"
    } into ${home}/${target}` + (mode === "auto" && !cuda ? ` (${nvcc ? "no GPU visible" : "no nvcc on PATH"})` : ""),
  );
  const configure = ["cmake", "-S", sources, "-B", build, "-DCMAKE_BUILD_TYPE=Release"];
  configure.push(`-DSWITCHYARD_CUDA=${cuda ? "ON" : "OFF"}`);
  if (cuda) configure.push(`-DSWITCHYARD_CUDA_ARCHITECTURES=${arch}`);
  const nccl = Deno.env.get("SWITCHYARD_NCCL_ROOT");
  if (nccl) configure.push(`-DSWITCHYARD_NCCL_ROOT=${nccl}`);
  await runCommand(configure);
  const jobs = options.jobs ?? navigator.hardwareConcurrency ?? 2;
  await runCommand(["cmake", "--build", build, "--target", "switchyard", "--parallel", String(jobs)]);

  // Checked before it takes the place of a working one: it must speak this package's ABI.
  const built = `${build}/${LIBRARY_FILE}`;
  const bad = checkLibraryFile(built);
  if (bad) throw new Error(bad);
  const installed = `${home}/${target}/${LIBRARY_FILE}`;
  await Deno.copyFile(built, `${installed}.partial`);
  await Deno.rename(`${installed}.partial`, installed);
  return installed;
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: { cuda: { type: "string" }, arch: { type: "string" }, jobs: { type: "string" } },
  });
  try {
    const jobs = values.jobs === undefined ? undefined : Number(values.jobs);
    if (jobs !== undefined && !(Number.isInteger(jobs) && jobs > 0)) throw new Error(`--jobs: ${values.jobs}`);
    const path = await buildIntoCache({ cuda: values.cuda, arch: values.arch, jobs });
    console.log(`switchyard: built ${path}; the package loads it from there`);
  } catch (e) {
    console.error(`switchyard build: ${e instanceof Error ? e.message : e}`);
    Deno.exit(1);
  }
}
