/**
 * The QEMU command line for one microvm, as a pure function of the VM's shape (unit
 * tested). Host channels are inherited socketpairs, never socket paths: QMP on fd 3, the
 * agent's virtio-serial port on fd 4, the serial console on fd 5.
 */
export type Accel = "kvm" | "tcg";

export const FD_QMP = 3;
export const FD_AGENT = 4;
export const FD_CONSOLE = 5;
/** Where a restoring QEMU reads the snapshot's device state from. */
export const FD_INCOMING = 6;
export const AGENT_PORT_NAME = "org.podflare.agent";

export interface VmShape {
  vcpuCount: number;
  memSizeMib: number;
}

export interface QemuArgsInput extends VmShape {
  accel: Accel;
  kernel: string;
  initrd: string;
  rootDisk: string;
  rootDiskFormat: "qcow2" | "raw";
  memPath: string;
  /** In the VM's own directory: it also marks the process as that VM's (reconcile finds strays by it). */
  pidFile: string;
  /** Host TSC frequency, passed to the guest so its calibration cannot hang under TCG. */
  tscKhz: number;
  /** Wait for an incoming migration (restore from a snapshot) instead of booting. */
  incoming?: boolean;
  /** Map guest memory shared (template/parent) or private copy-on-write (clones). */
  memShared?: boolean;
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
  for (const p of [input.kernel, input.initrd, input.rootDisk, input.memPath, input.pidFile]) {
    // QEMU option values are comma-separated: a comma in a path would inject options.
    if (p.includes(",")) throw new RangeError(`path ${p} contains a comma`);
  }
  const share = input.memShared === false ? "off" : "on";
  const args = [
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-pidfile",
    input.pidFile,
    "-M",
    "microvm,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem",
    "-accel",
    input.accel === "kvm" ? "kvm" : "tcg,thread=multi",
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
    "-drive",
    `id=root,file=${input.rootDisk},format=${input.rootDiskFormat},if=none,discard=unmap`,
    "-device",
    "virtio-blk-device,drive=root",
  ];
  if (input.incoming) args.push("-incoming", "defer");
  return args;
}
