/**
 * The QEMU command line for one microvm, as a pure function of the VM's shape (unit
 * tested). Host channels are inherited socketpairs, never socket paths: QMP on fd 3, the
 * agent's virtio-serial port on fd 4, the serial console on fd 5.
 */
import type { VmCredentials } from "../../jail/uids.js";
import type { Accel, VmShape } from "../backend.js";

export type { Accel, VmShape };

export const FD_QMP = 3;
export const FD_AGENT = 4;
export const FD_CONSOLE = 5;
/** Where a restoring QEMU reads the snapshot's device state from. */
export const FD_INCOMING = 6;
/**
 * Where QEMU finds guest RAM when it is handed over as an inherited memfd (VMs under their
 * own uid: the sealed memfd of their lineage's template). QEMU 7.2 opens the
 * memory path read-write even for a private mapping, so a shared template file would
 * have to be writable by every VM; a write-sealed memfd can be opened but never written.
 */
const FD_MEMORY = 7;
export const MEMFD_PATH = `/proc/self/fd/${FD_MEMORY}`;
/**
 * The disk chain comes as inherited fds, never paths (the layer files are root's, 0600,
 * in a directory only root can enter): the top overlay read-write at FD_DISK and
 * read-only at FD_DISK + 1 (both in fdset TOP_FDSET: QEMU reopens a layer read-only
 * when a fork freezes it), then each lower layer read-only at FD_DISK + 2 + j, in fdset
 * TOP_FDSET + 1 + j. QEMU opens `/dev/fdset/N`, and the command line names no file.
 */
export const FD_DISK = 8;
export const TOP_FDSET = 1;
/** The bottom layer's node (the template's disk): where a flatten streams down to. */
export const BASE_NODE = "pfbase";
/** A chain deeper than this is refused (config caps it far lower; see maxDiskChain). */
const MAX_LOWER_DISKS = 64;
/**
 * QEMU's seccomp filter: no obsolete syscalls, no set*uid/set*gid, no fork/exec (which
 * is why snapshots go through fd: and unix:, never exec:), no scheduler/affinity calls.
 */
export const SANDBOX_OPTION =
  "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/**
 * TCG translation cache (MiB). QEMU 7.2's default is 1 GiB (an eighth of host RAM at
 * most), touched as code is translated: a bound makes the per-VM memory limit meaningful.
 */
export const TCG_TB_SIZE_MIB = 128;
const AGENT_PORT_NAME = "org.podflare.agent";

export interface QemuArgsInput extends VmShape {
  accel: Accel;
  kernel: string;
  initrd: string;
  /**
   * How many layers lie below the top overlay (their fds follow it, see FD_DISK): fork
   * layers, then the template's disk. 0: a cold boot, whose overlay's own header names
   * the guest image (public, opened by path).
   */
  lowerDisks: number;
  memPath: string;
  /** In the VM's own directory: it also marks the process as that VM's (reconcile finds strays by it). */
  pidFile: string;
  /** Host TSC frequency, passed to the guest so its calibration cannot hang under TCG. */
  tscKhz: number;
  /** Wait for an incoming migration (restore from a snapshot) instead of booting. */
  incoming?: boolean;
  /**
   * The incoming state is devices only (a fork's `xen-save-devices-state`: no RAM, no
   * configuration section, recorded as running): the VM stays paused after it loads (-S)
   * and expects neither a configuration nor a vmdescription section.
   */
  deviceStateOnly?: boolean;
  /** Map guest memory shared (template/parent) or private copy-on-write (clones). */
  memShared?: boolean;
  /** QEMU's seccomp sandbox (default on). */
  sandbox?: boolean;
}

export function kernelCommandLine(input: Pick<QemuArgsInput, "accel" | "tscKhz">): string {
  const args = [
    "console=ttyS0",
    "loglevel=4",
    "panic=-1",
    "reboot=t",
    "root=/dev/vda",
    "rw",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "nohz=on",
    "random.trust_cpu=off",
    "systemd.show_status=0",
  ];
  if (input.accel === "tcg") {
    // Under TCG the PIT-based TSC calibration races a busy host and can hang the boot;
    // a given frequency plus a trusted TSC make boots reliable and idle guests cheap.
    args.push(`tsc_early_khz=${input.tscKhz}`, "no_timer_check", "clocksource=tsc", "tsc=reliable");
  }
  return args.join(" ");
}

export function buildQemuArgs(input: QemuArgsInput): string[] {
  if (!Number.isInteger(input.vcpuCount) || input.vcpuCount < 1)
    throw new RangeError("vcpuCount must be a positive integer");
  if (!Number.isInteger(input.memSizeMib) || input.memSizeMib < 128)
    throw new RangeError("memSizeMib must be an integer >= 128");
  if (
    !Number.isInteger(input.lowerDisks) ||
    input.lowerDisks < 0 ||
    input.lowerDisks > MAX_LOWER_DISKS
  )
    throw new RangeError(`lowerDisks must be an integer in [0, ${MAX_LOWER_DISKS}]`);
  for (const p of [input.kernel, input.initrd, input.memPath, input.pidFile]) {
    // QEMU option values are comma-separated: a comma in a path would inject options.
    if (p.includes(",")) throw new RangeError(`path ${p} contains a comma`);
  }
  const share = input.memShared === false ? "off" : "on";
  const args = [
    ...(input.sandbox === false ? [] : ["-sandbox", SANDBOX_OPTION]),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-pidfile",
    input.pidFile,
    "-M",
    `microvm,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem${input.deviceStateOnly ? ",suppress-vmdesc=on" : ""}`,
    "-accel",
    input.accel === "kvm" ? "kvm" : `tcg,thread=multi,tb-size=${TCG_TB_SIZE_MIB}`,
    "-cpu",
    input.accel === "kvm" ? "host" : "max",
    "-smp",
    String(input.vcpuCount),
    "-m",
    `${input.memSizeMib}M`,
    "-object",
    `memory-backend-file,id=mem,size=${input.memSizeMib}M,mem-path=${input.memPath},share=${share}`,
    // A restore resumes a running kernel: loading the boot blobs would only cost start-up
    // time and about 20 MB of QEMU memory per VM (the firmware never runs again).
    ...(input.incoming
      ? []
      : ["-kernel", input.kernel, "-initrd", input.initrd, "-append", kernelCommandLine(input)]),
    "-chardev",
    `socket,id=qmp,fd=${FD_QMP},server=off`,
    "-mon",
    "chardev=qmp,mode=control",
    "-device",
    "virtio-serial-device,max_ports=2",
    "-chardev",
    `socket,id=agent,fd=${FD_AGENT},server=off`,
    "-device",
    `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
    "-chardev",
    `socket,id=console,fd=${FD_CONSOLE},server=off`,
    "-serial",
    "chardev:console",
    ...diskArgs(input.lowerDisks),
    "-device",
    "virtio-blk-device,drive=root",
  ];
  if (input.incoming) args.push("-incoming", "defer");
  if (input.incoming && input.deviceStateOnly)
    args.push("-S", "-global", "migration.send-configuration=off");
  return args;
}

/**
 * The root disk: `-add-fd` for each layer's fds, and one `-drive` spelling the whole
 * chain (each layer's `backing` is the one below), so QEMU never opens a path from a
 * qcow2 header except the public guest image's below a cold boot's overlay. The layers
 * below the top are children of the drive, not monitor-owned nodes: a flatten that
 * merges them closes them. `auto-read-only=off`: the top is opened read-write at once
 * (dynamic auto-read-only would open it read-only first, leaving that descriptor's image
 * locks behind in the fdset).
 */
function diskArgs(lowerDisks: number): string[] {
  const args = [
    "-add-fd",
    `fd=${FD_DISK},set=${TOP_FDSET},opaque=rw`,
    "-add-fd",
    `fd=${FD_DISK + 1},set=${TOP_FDSET},opaque=ro`,
  ];
  const drive = [
    "id=root",
    "if=none",
    "discard=unmap",
    "driver=qcow2",
    "file.driver=file",
    `file.filename=/dev/fdset/${TOP_FDSET}`,
    "file.auto-read-only=off",
  ];
  let prefix = "";
  for (let j = 0; j < lowerDisks; j++) {
    const set = TOP_FDSET + 1 + j;
    args.push("-add-fd", `fd=${FD_DISK + 2 + j},set=${set},opaque=ro`);
    prefix += "backing.";
    drive.push(
      `${prefix}driver=qcow2`,
      `${prefix}read-only=on`,
      `${prefix}file.driver=file`,
      `${prefix}file.filename=/dev/fdset/${set}`,
    );
    if (j === lowerDisks - 1) drive.push(`${prefix}node-name=${BASE_NODE}`);
  }
  args.push("-drive", drive.join(","));
  return args;
}

/** Who QEMU runs as: its own unprivileged uid and gid (the daemon runs as root), or unchanged. */
export type QemuCredentials = VmCredentials;

/**
 * The launcher in front of QEMU: optional `nice`, then util-linux `setpriv`, which
 * switches to the VM's uid/gid with no supplementary groups and no_new_privs, and sets
 * the parent-death signal. setpriv (util-linux 2.38) applies --pdeathsig after the
 * credential change (the kernel clears PDEATHSIG when credentials change), so the VM
 * still dies with the daemon: packages/e2e/src/restart.e2e.test.ts checks it.
 */
export function qemuCommand(
  qemuBinary: string,
  args: readonly string[],
  options: { nice?: number; creds?: QemuCredentials | null } = {},
): string[] {
  const nice = options.nice ?? 0;
  const creds = options.creds;
  if (creds) {
    for (const id of [creds.uid, creds.gid])
      if (!Number.isSafeInteger(id) || id <= 0 || id >= 2 ** 32 - 1)
        throw new RangeError(`invalid VM uid/gid ${id}`);
  }
  return [
    ...(nice > 0 ? ["nice", "-n", String(nice)] : []),
    "setpriv",
    ...(creds
      ? [
          "--reuid",
          String(creds.uid),
          "--regid",
          String(creds.gid),
          "--clear-groups",
          "--no-new-privs",
        ]
      : []),
    "--pdeathsig",
    "KILL",
    "--",
    qemuBinary,
    ...args,
  ];
}
