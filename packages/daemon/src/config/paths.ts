/**
 * Every path the daemon uses, resolved once from the configured directories: the one
 * place that knows where the database, VM directories, memory files, disk layers, fork
 * directories and uid claims live. Nothing else joins a name onto a configured directory.
 */
import { join } from "node:path";

export interface DaemonPaths {
  /** PODFLARE_STATE_DIR: persistent, root's. */
  readonly stateDir: string;
  /** The SQLite database (sandboxes, keys). */
  readonly database: string;
  /** One directory per VM (console log, pid file, sockets). */
  readonly vmsDir: string;
  /** Disk layers (overlays and frozen fork layers): root's, 0700. */
  readonly layersDir: string;
  /** PODFLARE_SHM_DIR: memory files, on a tmpfs. */
  readonly shmDir: string;
  /** Guest memory files of running VMs. */
  readonly vmMemDir: string;
  /** A fork's transfer directories while it runs. */
  readonly forksDir: string;
  /** PODFLARE_IMAGES_DIR: built guest images (shareable). */
  readonly imagesDir: string;
  /** PODFLARE_TEMPLATES_DIR: template snapshots (shareable). */
  readonly templatesDir: string;
  /** Claims of per-VM uids, shared by every daemon on the host. */
  readonly uidClaimsDir: string;
}

/** Where per-VM uid claims live: one host-wide directory, so two daemons never share a uid. */
export const UID_CLAIMS_DIR = "/run/podflare/vm-uids";

export function resolvePaths(dirs: {
  stateDir: string;
  shmDir: string;
  imagesDir: string;
  templatesDir: string;
}): DaemonPaths {
  return Object.freeze({
    stateDir: dirs.stateDir,
    database: join(dirs.stateDir, "podflare.db"),
    vmsDir: join(dirs.stateDir, "vms"),
    layersDir: join(dirs.stateDir, "layers"),
    shmDir: dirs.shmDir,
    vmMemDir: join(dirs.shmDir, "vms"),
    forksDir: join(dirs.shmDir, "forks"),
    imagesDir: dirs.imagesDir,
    templatesDir: dirs.templatesDir,
    uidClaimsDir: UID_CLAIMS_DIR,
  });
}
