/**
 * The rendezvous secret of a job started without `SWITCHYARD_TOKEN` (torchrun or Slurm on one
 * host): rank 0 writes a fresh random secret into a file only this user can read, in a
 * directory only this user can enter, and every other rank reads it there. A process of another
 * local user can then neither join the store nor read or write its keys. A store bound beyond
 * loopback still needs `SWITCHYARD_TOKEN` (the ranks may not share a file system).
 *
 *   directory  `$XDG_RUNTIME_DIR/switchyard`, else `/tmp/switchyard-<uid>`: created with mode
 *              0700; used only if it is a real directory (not a link) of this user, mode 0700
 *   file       `job-<MASTER_PORT>[-<SLURM_JOB_ID or TORCHELASTIC_RUN_ID>].token`, mode 0600,
 *              written whole (a new file renamed into place), removed when rank 0's group goes
 *
 * @module
 */

import { SwitchyardError } from "./errors.ts";
import type { EnvReader } from "./dist_env.ts";

/** Where the secret of the job on `port` lives, and the directory that holds it. */
export interface JobSecretPlace {
  /** The user-only directory. */
  readonly dir: string;
  /** The secret's file in it. */
  readonly file: string;
}

/** The place of the job's secret (nothing is created). */
export function jobSecretPlace(get: EnvReader, port: number): JobSecretPlace {
  const runtime = get("XDG_RUNTIME_DIR");
  const dir = runtime ? `${runtime.replace(/\/+$/, "")}/switchyard` : `/tmp/switchyard-${userId(get)}`;
  const job = get("SLURM_JOB_ID") || get("TORCHELASTIC_RUN_ID");
  const suffix = job ? `-${job.replace(/[^A-Za-z0-9_.-]/g, "_").slice(0, 64)}` : "";
  return { dir, file: `${dir}/job-${port}${suffix}.token` };
}

function userId(get: EnvReader): string {
  try {
    return String(Deno.uid() ?? get("USER") ?? "user");
  } catch { // --allow-sys=uid not granted: the user's name instead (the checks below still hold)
    return (get("USER") || get("LOGNAME") || "user").replace(/[^A-Za-z0-9_.-]/g, "_");
  }
}

function refuse(what: string): never {
  throw new SwitchyardError(
    "INVALID_ARGUMENT",
    `SWITCHYARD_TOKEN: not set, and ${what}; set SWITCHYARD_TOKEN to the same secret on every rank ` +
      `(e.g. $(openssl rand -hex 16)), or start the ranks with 'deno task launch'`,
    { argument: "SWITCHYARD_TOKEN" },
  );
}

// The uid of this process: that of a file it just created (needs no --allow-sys).
function ownUid(dir: string): number | null {
  const probe = `${dir}/.probe-${crypto.randomUUID()}`;
  Deno.writeTextFileSync(probe, "", { mode: 0o600, createNew: true });
  try {
    return Deno.lstatSync(probe).uid;
  } finally {
    Deno.removeSync(probe);
  }
}

/** Creates the directory if needed and checks it is this user's alone; returns this uid. */
function userOnlyDir(dir: string): number | null {
  try {
    Deno.mkdirSync(dir, { mode: 0o700 });
  } catch (e) {
    if (!(e instanceof Deno.errors.AlreadyExists)) refuse(`${dir} could not be created (${(e as Error).message})`);
  }
  const st = Deno.lstatSync(dir);
  const mode = (st.mode ?? 0) & 0o777;
  if (st.isSymlink || !st.isDirectory) refuse(`${dir} is not a directory`);
  if (mode !== 0o700) refuse(`${dir} has mode 0${mode.toString(8)} (0700 needed: only this user may enter it)`);
  let uid: number | null;
  try {
    uid = ownUid(dir);
  } catch (e) {
    refuse(`${dir} is not writable by this user (${(e as Error).message})`);
  }
  if (st.uid !== uid) refuse(`${dir} belongs to uid ${st.uid}, not to this user (uid ${uid})`);
  return uid;
}

/** Rank 0: a fresh secret for the job, written where the other ranks will read it. */
export function writeJobSecret(place: JobSecretPlace): string {
  userOnlyDir(place.dir);
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  const secret = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  const fresh = `${place.file}.${crypto.randomUUID()}`;
  Deno.writeTextFileSync(fresh, secret, { mode: 0o600, createNew: true });
  Deno.renameSync(fresh, place.file);
  return secret;
}

/** The other ranks: the job's secret, or undefined while rank 0 has not written it yet. */
export function readJobSecret(place: JobSecretPlace): string | undefined {
  const uid = userOnlyDir(place.dir);
  let st: Deno.FileInfo;
  try {
    st = Deno.lstatSync(place.file);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw e;
  }
  if (st.isSymlink || !st.isFile || st.uid !== uid || ((st.mode ?? 0) & 0o777) !== 0o600) {
    refuse(`${place.file} is not a file of this user with mode 0600`);
  }
  const secret = Deno.readTextFileSync(place.file).trim();
  return /^[0-9a-f]{64}$/.test(secret) ? secret : undefined;
}

/** Rank 0, when its group goes: the secret's file (best effort). */
export function removeJobSecret(place: JobSecretPlace): void {
  try {
    Deno.removeSync(place.file);
  } catch { /* already gone */ }
}
