/**
 * `podflare image build`: kernel, initramfs and root file system for the guest, built
 * without mounting anything, cached under <imagesDir>/<key>/ by content hash.
 * Concurrent builders of one key (several tests, several daemons) serialise on a lock
 * file; the loser finds the finished image.
 */
import { constants } from "node:fs";
import {
  access,
  copyFile,
  mkdir,
  readdir,
  readFile,
  rename,
  rm,
  stat,
  writeFile,
} from "node:fs/promises";
import { dirname, join } from "node:path";
import { DEFAULT_TEMPLATE, TEMPLATES, templateSpec } from "../templates/registry.js";
import { CleanupStack } from "../util/cleanup.js";
import { withFileLock } from "../util/lock.js";
import { run } from "../util/run.js";
import { ensureSafeDir } from "../util/safe-dir.js";
import {
  DEBIAN_SUITE,
  DPKG_EXCLUDES,
  GUEST_FILES,
  KERNEL_META_PACKAGE,
  KERNEL_MODULES,
  type KernelPackage,
  ROOTFS_SIZE,
  recipeKey,
  rootTreeKey,
} from "./recipe.js";

/** How many built images to keep per template; older ones are removed after a build. */
const KEEP_IMAGES = 3;

export interface GuestImage {
  key: string;
  dir: string;
  kernel: string;
  initrd: string;
  rootfs: string;
  kernelPackage: KernelPackage;
}

export type Progress = (message: string) => void;

/** Debian package that provides each tool, for the error message when one is missing. */
const REQUIRED_TOOLS: Record<string, string> = {
  "apt-get": "apt",
  "apt-cache": "apt",
  "dpkg-deb": "dpkg",
  mmdebstrap: "mmdebstrap",
  "mkfs.ext4": "e2fsprogs",
  cpio: "cpio",
  gzip: "gzip",
};

async function onPath(tool: string): Promise<boolean> {
  for (const dir of (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/sbin"])) {
    try {
      await access(join(dir, tool), constants.X_OK);
      return true;
    } catch {}
  }
  return false;
}

async function checkTools(): Promise<void> {
  const missing: string[] = [];
  for (const [tool, pkg] of Object.entries(REQUIRED_TOOLS)) {
    if (!(await onPath(tool))) missing.push(`${tool} (Debian package ${pkg})`);
  }
  const busybox = await readFile("/bin/busybox").catch(() => null);
  if (!busybox || !isStaticElf(busybox)) {
    missing.push("a static /bin/busybox (Debian package busybox-static)");
  }
  if (missing.length > 0) {
    throw new Error(
      `cannot build the guest image; missing: ${missing.join(", ")}. ` +
        "Install them with apt-get install, or run scripts/setup.sh.",
    );
  }
  if (process.getuid?.() !== 0) {
    throw new Error(
      "building the guest image needs root (mmdebstrap, device nodes); run it as root",
    );
  }
}

/** A 64-bit little-endian ELF with no PT_INTERP program header needs no dynamic loader. */
export function isStaticElf(file: Buffer): boolean {
  if (file.length < 64 || file.readUInt32BE(0) !== 0x7f454c46 || file[4] !== 2 || file[5] !== 1)
    return false;
  const phoff = Number(file.readBigUInt64LE(32));
  const phentsize = file.readUInt16LE(54);
  const phnum = file.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * phentsize;
    if (at + 4 > file.length) return false;
    if (file.readUInt32LE(at) === 3) return false; // PT_INTERP
  }
  return true;
}

export async function resolveKernelPackage(): Promise<KernelPackage> {
  // One apt call (about a second): the meta package pins the exact kernel package.
  const show = await run("apt-cache", ["show", "--no-all-versions", KERNEL_META_PACKAGE]).catch(
    () => "",
  );
  const match = /^Depends:.*?\b(linux-image-[\w.+-]+)\s*\(=\s*([^)\s]+)\)/m.exec(show);
  if (!match?.[1] || !match[2]) {
    throw new Error(
      `apt does not know ${KERNEL_META_PACKAGE}; run \`apt-get update\` (the package lists may be missing)`,
    );
  }
  return { name: match[1], version: match[2] };
}

export function imagePaths(
  imagesDir: string,
  key: string,
  kernelPackage: KernelPackage,
): GuestImage {
  const dir = join(imagesDir, key);
  return {
    key,
    dir,
    kernel: join(dir, "vmlinuz"),
    initrd: join(dir, "initrd.img"),
    rootfs: join(dir, "rootfs.ext4"),
    kernelPackage,
  };
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Return the cached image of a template (templates/registry.ts; default: "default") for
 * the current recipe, building it first if needed.
 */
export async function ensureImage(
  opts: { imagesDir: string; guestDir: string; template?: string },
  progress: Progress = () => {},
): Promise<GuestImage> {
  const { packages } = templateSpec(opts.template ?? DEFAULT_TEMPLATE);
  const kernelPackage = await resolveKernelPackage();
  const key = await recipeKey(opts.guestDir, kernelPackage, packages);
  const image = imagePaths(opts.imagesDir, key, kernelPackage);
  const manifest = join(image.dir, "manifest.json");
  if (await exists(manifest)) return image;

  // VM uids read the kernel, initrd and root disk by path: traversable and readable by all,
  // writable by the daemon alone (refused if it is a link or someone else's).
  ensureSafeDir(opts.imagesDir, 0o755, "the images directory (PODFLARE_IMAGES_DIR)");
  return withFileLock(join(opts.imagesDir, `.lock-${key}`), async () => {
    if (await exists(manifest)) return image; // another builder finished while we waited
    // The daemon runs with umask 077; the image is for every VM uid (and its root tree
    // keeps the modes a Debian system expects), so it is built with the usual 022.
    const umask = process.umask(0o022);
    try {
      return await build();
    } finally {
      process.umask(umask);
    }
  });

  async function build(): Promise<GuestImage> {
    await checkTools();
    const started = Date.now();
    progress(`building guest image ${key} (kernel ${kernelPackage.name} ${kernelPackage.version})`);
    const cleanup = new CleanupStack();
    const work = join(opts.imagesDir, `.build-${key}-${process.pid}`);
    await rm(work, { recursive: true, force: true });
    await mkdir(work, { recursive: true });
    cleanup.defer("remove build directory", () => rm(work, { recursive: true, force: true }));
    try {
      await buildInto(work, opts.imagesDir, opts.guestDir, kernelPackage, packages, progress);
      await writeFile(
        join(work, "out", "manifest.json"),
        `${JSON.stringify({ key, kernelPackage, suite: DEBIAN_SUITE, builtAt: new Date().toISOString() }, null, 2)}\n`,
      );
      await rm(image.dir, { recursive: true, force: true });
      await rename(join(work, "out"), image.dir);
      progress(
        `guest image ${key} ready in ${((Date.now() - started) / 1000).toFixed(1)} s: ${image.dir}`,
      );
      await pruneImages(opts.imagesDir, key);
      return image;
    } finally {
      await cleanup.unwind();
    }
  }
}

/**
 * Remove all but the newest images, KEEP_IMAGES for each template (running VMs keep their
 * open files).
 */
async function pruneImages(imagesDir: string, keep: string): Promise<void> {
  const entries = await readdir(imagesDir, { withFileTypes: true });
  const images = await Promise.all(
    entries
      .filter((e) => e.isDirectory() && /^[0-9a-f]{16}$/.test(e.name) && e.name !== keep)
      .map(async (e) => ({ name: e.name, mtime: (await stat(join(imagesDir, e.name))).mtimeMs })),
  );
  images.sort((a, b) => b.mtime - a.mtime);
  for (const old of images.slice(KEEP_IMAGES * TEMPLATES.length - 1))
    await rm(join(imagesDir, old.name), { recursive: true, force: true });
}

/**
 * The Debian root tree from mmdebstrap, cached under .cache/ by its own key so that a
 * change to the agent does not repeat the slow package installation.
 */
async function ensureRootTree(
  imagesDir: string,
  packages: readonly string[],
  progress: Progress,
): Promise<string> {
  const cacheDir = join(imagesDir, ".cache");
  const tree = join(cacheDir, `root-${rootTreeKey(packages)}`);
  // Every template's tree is kept; only trees of no template's packages go.
  const current = new Set(TEMPLATES.map((t) => `root-${rootTreeKey(t.packages)}`));
  if (await exists(join(tree, ".podflare-complete"))) return tree;
  await mkdir(cacheDir, { recursive: true });
  const partial = `${tree}.partial-${process.pid}`;
  await rm(partial, { recursive: true, force: true });
  let lines = 0;
  try {
    await run(
      "mmdebstrap",
      [
        "--variant=minbase",
        `--include=${packages.join(",")}`,
        ...DPKG_EXCLUDES.map((p) => `--dpkgopt=path-exclude=${p}`),
        DEBIAN_SUITE,
        partial,
      ],
      {
        onLine: (line) => {
          lines += 1;
          if (/^I: /.test(line) || lines % 50 === 0) progress(`      ${line.slice(0, 120)}`);
        },
      },
    );
    await writeFile(join(partial, ".podflare-complete"), "");
    await rm(tree, { recursive: true, force: true });
    await rename(partial, tree);
  } catch (err) {
    await rm(partial, { recursive: true, force: true });
    throw err;
  }
  for (const entry of await readdir(cacheDir)) {
    if (entry.startsWith("root-") && !current.has(entry) && !entry.includes(".partial-")) {
      await rm(join(cacheDir, entry), { recursive: true, force: true });
    }
  }
  return tree;
}

async function buildInto(
  work: string,
  imagesDir: string,
  guestDir: string,
  kernelPackage: KernelPackage,
  packages: readonly string[],
  progress: Progress,
): Promise<void> {
  const out = join(work, "out");
  await mkdir(out);
  const step = (n: number, what: string) => progress(`[${n}/4] ${what}`);

  step(1, `kernel: apt-get download ${kernelPackage.name}`);
  const debDir = join(
    imagesDir,
    ".cache",
    `kernel-${kernelPackage.name}-${kernelPackage.version.replace(/[^\w.+-]/g, "_")}`,
  );
  await mkdir(debDir, { recursive: true });
  if (!(await readdir(debDir)).some((f) => f.endsWith(".deb"))) {
    await run("apt-get", ["download", `${kernelPackage.name}=${kernelPackage.version}`], {
      cwd: debDir,
    });
  }
  const deb = (await readdir(debDir)).find((f) => f.endsWith(".deb"));
  if (!deb) throw new Error(`apt-get download produced no .deb for ${kernelPackage.name}`);
  const kernelTree = join(work, "kernel");
  await run("dpkg-deb", ["-x", join(debDir, deb), kernelTree]);
  const vmlinuz = (await readdir(join(kernelTree, "boot"))).find((f) => f.startsWith("vmlinuz-"));
  if (!vmlinuz) throw new Error(`${deb} holds no /boot/vmlinuz-*`);
  await copyFile(join(kernelTree, "boot", vmlinuz), join(out, "vmlinuz"));

  step(2, "initramfs: busybox-static, virtio modules, init");
  const initramfs = join(work, "initramfs");
  await mkdir(join(initramfs, "bin"), { recursive: true });
  await mkdir(join(initramfs, "lib/modules"), { recursive: true });
  await copyFile("/bin/busybox", join(initramfs, "bin/busybox"));
  const release = vmlinuz.slice("vmlinuz-".length);
  const moduleFiles = await findModules(join(kernelTree, "lib/modules", release, "kernel"));
  for (const mod of KERNEL_MODULES) {
    const path = moduleFiles.get(`${mod}.ko`);
    if (!path) throw new Error(`kernel ${release} has no module ${mod}.ko`);
    await copyFile(path, join(initramfs, "lib/modules", `${mod}.ko`));
  }
  await copyFile(join(guestDir, "image/init"), join(initramfs, "init"));
  await run("chmod", ["0755", join(initramfs, "init"), join(initramfs, "bin/busybox")]);
  await run("sh", [
    "-c",
    'cd "$1" && find . -print0 | cpio --null -o -H newc --quiet --owner=0:0 | gzip -1 > "$2"',
    "sh",
    initramfs,
    join(out, "initrd.img"),
  ]);

  step(
    3,
    `root file system: Debian ${DEBIAN_SUITE} minbase + ${packages.join(", ")} (cached; the first build takes about a minute)`,
  );
  const tree = await ensureRootTree(imagesDir, packages, progress);
  const root = join(work, "root");
  await run("cp", ["-a", "--reflink=auto", tree, root]);
  await rm(join(root, ".podflare-complete"));
  await mkdir(join(root, "opt/podflare"), { recursive: true });
  for (const file of GUEST_FILES.filter((f) => f.startsWith("agent/"))) {
    const target = join(root, "opt/podflare", file.slice("agent/".length));
    await mkdir(dirname(target), { recursive: true }); // the agent's package directory
    await copyFile(join(guestDir, file), target);
  }
  await writeFile(join(root, "etc/hostname"), "sandbox\n");
  await writeFile(
    join(root, "etc/hosts"),
    "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost\n",
  );
  await writeFile(join(root, "etc/machine-id"), "");
  await mkdir(join(root, "root"), { recursive: true });

  step(4, `ext4 image: mkfs.ext4 -d (${ROOTFS_SIZE}, nothing mounted)`);
  await run("mkfs.ext4", [
    "-q",
    "-F",
    "-L",
    "podflare-root",
    "-O",
    "^has_journal",
    "-E",
    "root_owner=0:0",
    "-d",
    root,
    join(out, "rootfs.ext4"),
    ROOTFS_SIZE,
  ]);
}

async function findModules(
  dir: string,
  found = new Map<string, string>(),
): Promise<Map<string, string>> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await findModules(path, found);
    else if (entry.name.endsWith(".ko")) found.set(entry.name, path);
  }
  return found;
}
