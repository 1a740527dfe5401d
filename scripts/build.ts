/**
 * Builds libswitchyard with CMake into `build/` (Release, out of source).
 *
 * Environment: `SWITCHYARD_CUDA` (AUTO, ON, OFF; default AUTO: kernels are compiled when nvcc is
 * found), `SWITCHYARD_CUDA_ARCHITECTURES` (default 90), `SWITCHYARD_NCCL_ROOT` (NCCL headers;
 * default `.tools/nccl` when `.ci/fetch-nccl-headers.sh` has put them there),
 * `SWITCHYARD_SANITIZE` (e.g. `address,undefined` or `thread`: instrumented host code), `SWITCHYARD_BUILD_DIR`
 * (default `build`).
 *
 * @module
 */

const root = new URL("..", import.meta.url).pathname;
const env = (name: string) => Deno.env.get(name) ?? "";
const buildDir = env("SWITCHYARD_BUILD_DIR") || `${root}build`;

async function run(cmd: string[]): Promise<void> {
  let child;
  try {
    child = new Deno.Command(cmd[0], { args: cmd.slice(1), stdout: "inherit", stderr: "inherit" }).spawn();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      console.error(`build: '${cmd[0]}' is not installed; the library needs CMake >= 3.24 and a C++20 compiler`);
      Deno.exit(1);
    }
    throw e;
  }
  const { code } = await child.status;
  if (code !== 0) {
    console.error(`build: '${cmd.join(" ")}' failed with exit code ${code}`);
    Deno.exit(code);
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

const configure = ["cmake", "-S", root, "-B", buildDir, "-DCMAKE_BUILD_TYPE=Release"];
const cuda = env("SWITCHYARD_CUDA");
if (cuda) configure.push(`-DSWITCHYARD_CUDA=${cuda}`);
const archs = env("SWITCHYARD_CUDA_ARCHITECTURES");
if (archs) configure.push(`-DSWITCHYARD_CUDA_ARCHITECTURES=${archs}`);
const sanitize = env("SWITCHYARD_SANITIZE");
if (sanitize) configure.push(`-DSWITCHYARD_SANITIZE=${sanitize}`);
const nccl = env("SWITCHYARD_NCCL_ROOT") || (exists(`${root}.tools/nccl/include/nccl.h`) ? `${root}.tools/nccl` : "");
if (nccl) configure.push(`-DSWITCHYARD_NCCL_ROOT=${nccl}`);

// Configure on the first build, or when the options differ from the cached ones.
const cache = exists(`${buildDir}/CMakeCache.txt`) ? Deno.readTextFileSync(`${buildDir}/CMakeCache.txt`) : "";
const stale = !cache ||
  (cuda && !cache.includes(`SWITCHYARD_CUDA:STRING=${cuda}`)) ||
  (archs && !cache.includes(`SWITCHYARD_CUDA_ARCHITECTURES:STRING=${archs}`)) ||
  (sanitize && !cache.includes(`SWITCHYARD_SANITIZE:STRING=${sanitize}`)) ||
  (nccl && !cache.includes(`SWITCHYARD_NCCL_ROOT:PATH=${nccl}`));
if (stale) await run(configure);
await run(["cmake", "--build", buildDir, "--parallel", String(navigator.hardwareConcurrency || 2)]);
