/**
 * What goes into a guest image, and the content hash that names a build of it.
 * Change anything here, in a template's packages (templates/) or in guest/ and the hash
 * changes, so the next build rebuilds.
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";

/** Bump when the build steps change in a way the inputs below do not capture. */
export const RECIPE_VERSION = 3;
export const DEBIAN_SUITE = "bookworm";
export const KERNEL_META_PACKAGE = "linux-image-cloud-amd64";
export const ROOTFS_SIZE = "2G";
/** In load order: each module's dependencies come before it. */
export const KERNEL_MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_mmio",
  "virtio_blk",
  "virtio_console",
] as const;
/** Files of guest/ that end up in the image, relative to guest/. */
export const GUEST_FILES = [
  "image/init",
  "agent/podflare_agent/__init__.py",
  "agent/podflare_agent/__main__.py",
  "agent/podflare_agent/cgroups.py",
  "agent/podflare_agent/dispatch.py",
  "agent/podflare_agent/execqueue.py",
  "agent/podflare_agent/files.py",
  "agent/podflare_agent/identity.py",
  "agent/podflare_agent/output.py",
  "agent/podflare_agent/protocol.py",
  "agent/podflare_agent/runtime.py",
  "agent/podflare_agent/scheduler.py",
  "agent/podflare_agent/supervisor.py",
  "agent/podflare_agent/worker.py",
  "agent/podflare_init.py",
] as const;

export interface KernelPackage {
  name: string;
  version: string;
}

/**
 * The key of the Debian root tree alone (the slow mmdebstrap step), reused across agent
 * changes. `packages`: the template's (templates/).
 */
export function rootTreeKey(packages: readonly string[]): string {
  return createHash("sha256")
    .update(
      JSON.stringify({ RECIPE_VERSION, DEBIAN_SUITE, ROOTFS_PACKAGES: packages, DPKG_EXCLUDES }),
    )
    .digest("hex")
    .slice(0, 16);
}

export const DPKG_EXCLUDES = [
  "/usr/share/doc/*",
  "/usr/share/man/*",
  "/usr/share/locale/*",
  "/usr/share/info/*",
] as const;

export async function recipeKey(
  guestDir: string,
  kernel: KernelPackage,
  packages: readonly string[],
): Promise<string> {
  const hash = createHash("sha256");
  hash.update(
    JSON.stringify({
      RECIPE_VERSION,
      DEBIAN_SUITE,
      ROOTFS_PACKAGES: packages,
      ROOTFS_SIZE,
      KERNEL_MODULES,
      kernel,
    }),
  );
  for (const file of GUEST_FILES) {
    hash.update(`\0${file}\0`);
    hash.update(await readFile(join(guestDir, file)));
  }
  return hash.digest("hex").slice(0, 16);
}
