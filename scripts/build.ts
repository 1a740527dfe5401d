/**
 * Builds libswitchyard with CMake (Release, out of source).
 *
 * `deno run ... scripts/build.ts` builds `build/`; with `--cuda-cpu` it builds the CUDA backend
 * executed on CPU threads (`SWITCHYARD_CUDA=CPU`, tests/cuda_on_cpu) into `build-cuda-cpu/`.
 *
 * Environment: `SWITCHYARD_CUDA` (AUTO, ON, OFF, CPU; default AUTO: kernels are compiled when nvcc
 * and an NVIDIA GPU are found), `SWITCHYARD_CUDA_ARCHITECTURES` (default 90), `SWITCHYARD_NCCL_ROOT` (NCCL headers;
 * default `.tools/nccl` when `.ci/fetch-headers.sh` has put them there; the ibverbs headers come from `.tools/verbs`
 * likewise, or `SWITCHYARD_VERBS_INCLUDE`),
 * `SWITCHYARD_SANITIZE` (e.g. `address,undefined` or `thread`: instrumented host code and, in the
 * CPU build, kernels), `SWITCHYARD_BUILD_DIR` (default `build`, or `build-cuda-cpu`),
 * `SWITCHYARD_BUILD_TARGETS` (the CMake targets to build, comma-separated; default all), `CUDA_HOME`
 * (where the CPU build finds the toolkit's headers; default: next to nvcc, or /usr/local/cuda).
 *
 * @module
 */

import { runCommand } from "../src/cli/build.ts";

const root = new URL("..", import.meta.url).pathname;
const env = (name: string) => Deno.env.get(name) ?? "";

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The CUDA toolkit's include directory (`cuda_runtime_api.h`, libcu++ under `cccl/`), which the
 * CPU build compiles against; undefined when there is none. Looks at `CUDA_HOME`, `CUDA_PATH`,
 * the toolkit holding the `nvcc` on `PATH`, and /usr/local/cuda.
 */
export function cudaIncludeDir(): string | undefined {
  const candidates = [env("CUDA_HOME"), env("CUDA_PATH")].filter((d) => d).map((d) => `${d}/include`);
  for (const dir of (env("PATH") || "").split(":")) {
    if (!dir || !exists(`${dir}/nvcc`)) continue;
    try {
      candidates.push(`${Deno.realPathSync(`${dir}/nvcc`).replace(/\/bin\/nvcc$/, "")}/include`);
    } catch {
      // a dangling link: not a toolkit
    }
  }
  candidates.push("/usr/local/cuda/include");
  return candidates.find((d) => exists(`${d}/cuda_runtime_api.h`) && exists(`${d}/cccl/cuda/atomic`));
}

async function run(cmd: string[]): Promise<void> {
  try {
    await runCommand(cmd);
  } catch (e) {
    console.error(`build: ${e instanceof Error ? e.message : e}`);
    Deno.exit(1);
  }
}

if (import.meta.main) {
  const cudaOnCpu = Deno.args.includes("--cuda-cpu");
  const buildDir = env("SWITCHYARD_BUILD_DIR") || `${root}${cudaOnCpu ? "build-cuda-cpu" : "build"}`;
  const configure = ["cmake", "-S", root, "-B", buildDir, "-DCMAKE_BUILD_TYPE=Release"];
  const cuda = cudaOnCpu ? "CPU" : env("SWITCHYARD_CUDA");
  if (cuda) configure.push(`-DSWITCHYARD_CUDA=${cuda}`);
  let cudaInclude = "";
  if (cuda === "CPU") {
    cudaInclude = cudaIncludeDir() ?? "";
    if (!cudaInclude) {
      console.error(
        "build: the CUDA backend executed on the CPU needs the CUDA toolkit's headers (cuda_runtime_api.h, " +
          "cccl/cuda/atomic); none found (set CUDA_HOME)",
      );
      Deno.exit(2);
    }
    configure.push(`-DSWITCHYARD_CUDA_INCLUDE:PATH=${cudaInclude}`);
  }
  const archs = env("SWITCHYARD_CUDA_ARCHITECTURES");
  if (archs) configure.push(`-DSWITCHYARD_CUDA_ARCHITECTURES=${archs}`);
  const sanitize = env("SWITCHYARD_SANITIZE");
  if (sanitize) configure.push(`-DSWITCHYARD_SANITIZE=${sanitize}`);
  const nccl = env("SWITCHYARD_NCCL_ROOT") ||
    (exists(`${root}.tools/nccl/include/nccl.h`) ? `${root}.tools/nccl` : "");
  if (nccl) configure.push(`-DSWITCHYARD_NCCL_ROOT=${nccl}`);

  // Configure on the first build, or when the options differ from the cached ones.
  const cache = exists(`${buildDir}/CMakeCache.txt`) ? Deno.readTextFileSync(`${buildDir}/CMakeCache.txt`) : "";
  const stale = !cache ||
    (cuda && !cache.includes(`SWITCHYARD_CUDA:STRING=${cuda}`)) ||
    (cudaInclude && !cache.includes(`SWITCHYARD_CUDA_INCLUDE:PATH=${cudaInclude}`)) ||
    (archs && !cache.includes(`SWITCHYARD_CUDA_ARCHITECTURES:STRING=${archs}`)) ||
    (sanitize && !cache.includes(`SWITCHYARD_SANITIZE:STRING=${sanitize}`)) ||
    (nccl && !cache.includes(`SWITCHYARD_NCCL_ROOT:PATH=${nccl}`));
  if (stale) await run(configure);
  const targets = env("SWITCHYARD_BUILD_TARGETS").split(/[\s,]+/).filter((t) => t).flatMap((t) => ["--target", t]);
  await run(["cmake", "--build", buildDir, ...targets, "--parallel", String(navigator.hardwareConcurrency || 2)]);
}
