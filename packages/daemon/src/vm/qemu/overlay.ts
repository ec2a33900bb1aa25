/** qcow2 overlays: the one place that runs `qemu-img create` for a VM disk. */
import { constants } from "node:fs";
import { open } from "node:fs/promises";
import { ROOTFS_SIZE } from "../../image/recipe.js";
import { run } from "../../util/run.js";

/**
 * Create an empty qcow2 overlay at `path` on `backing`. Without opening the backing file
 * (`-u`), so the overlay can name a path that does not exist yet or is locked by a
 * running VM; the virtual size is then the root disk's. The file is made first, new
 * (never through a link or over an existing file) and 0600: a disk layer is root's alone
 * from its first byte (QEMU gets it as an fd, see disk-fds.ts); qemu-img keeps the mode.
 */
export async function createOverlay(
  path: string,
  backing: string,
  backingFormat: "qcow2" | "raw",
): Promise<void> {
  await createOverlayFile(path);
  await formatOverlay(path, backing, backingFormat);
}

/** createOverlay's first half: the new, empty file (it can be opened from now on). */
export async function createOverlayFile(path: string): Promise<void> {
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
  await (await open(path, flags, 0o600)).close();
}

/** createOverlay's second half: qemu-img writes the overlay into the file made for it. */
export async function formatOverlay(
  path: string,
  backing: string,
  backingFormat: "qcow2" | "raw",
): Promise<void> {
  await run("qemu-img", [
    "create",
    "-q",
    "-u",
    "-f",
    "qcow2",
    "-F",
    backingFormat,
    "-b",
    backing,
    path,
    ROOTFS_SIZE,
  ]);
}
