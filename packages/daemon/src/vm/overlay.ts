/** qcow2 overlays: the one place that runs `qemu-img create` for a VM disk. */
import { ROOTFS_SIZE } from "../image/recipe.js";
import { run } from "../util/run.js";

/**
 * Create an empty qcow2 overlay at `path` on `backing`. Without opening the backing file
 * (`-u`), so the overlay can name a path that does not exist yet or is locked by a
 * running VM; the virtual size is then the root disk's.
 */
export async function createOverlay(
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
