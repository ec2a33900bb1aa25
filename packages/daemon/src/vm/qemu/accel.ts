/**
 * Choosing the accelerator. `/dev/kvm` existing proves nothing: on a PVM host it opens,
 * KVM_CREATE_VM succeeds, and a standard guest then hangs forever. So "auto" only picks
 * KVM when the CPU advertises hardware virtualization, the KVM module is not the PVM
 * flavour, and a real guest boots under KVM within a deadline; otherwise TCG, quickly.
 */
import { constants } from "node:fs";
import { access, readFile } from "node:fs/promises";
import type { AccelChoice } from "../../config/config.js";
import type { Accel } from "./qemu-args.js";

export interface AccelDecision {
  accel: Accel;
  reason: string;
}

export interface HostProbe {
  kvmDevice: () => Promise<boolean>;
  cpuFlags: () => Promise<string>;
  pvmModule: () => Promise<boolean>;
  /** Boot the real guest under KVM; resolve true once its agent answers. */
  bootUnderKvm: () => Promise<boolean>;
}

export const hostProbe = (bootUnderKvm: () => Promise<boolean>): HostProbe => ({
  kvmDevice: () =>
    access("/dev/kvm", constants.R_OK | constants.W_OK).then(
      () => true,
      () => false,
    ),
  cpuFlags: () => readFile("/proc/cpuinfo", "utf8").catch(() => ""),
  pvmModule: () =>
    access("/sys/module/kvm_pvm").then(
      () => true,
      () => false,
    ),
  bootUnderKvm,
});

export async function chooseAccel(choice: AccelChoice, probe: HostProbe): Promise<AccelDecision> {
  if (choice === "tcg")
    return { accel: "tcg", reason: "forced by configuration (PODFLARE_ACCEL=tcg)" };
  const kvmDevice = await probe.kvmDevice();
  if (choice === "kvm") {
    if (!kvmDevice)
      throw new Error(
        "PODFLARE_ACCEL=kvm but /dev/kvm is missing or not accessible; use auto or tcg",
      );
    return { accel: "kvm", reason: "forced by configuration (PODFLARE_ACCEL=kvm)" };
  }
  if (!kvmDevice) return { accel: "tcg", reason: "no usable /dev/kvm" };
  if (!/^flags\s*:.*\b(vmx|svm)\b/m.test(await probe.cpuFlags())) {
    return {
      accel: "tcg",
      reason:
        "/dev/kvm exists but the CPU shows no vmx/svm (paravirtual KVM such as PVM cannot boot a standard guest)",
    };
  }
  if (await probe.pvmModule())
    return { accel: "tcg", reason: "the host's KVM is the kvm_pvm flavour" };
  if (await probe.bootUnderKvm()) return { accel: "kvm", reason: "a guest booted under KVM" };
  return { accel: "tcg", reason: "a probe guest did not boot under KVM within its deadline" };
}

/** Host TSC frequency in kHz from /proc/cpuinfo (the first CPU's "cpu MHz"). */
export async function hostTscKhz(): Promise<number> {
  const info = await readFile("/proc/cpuinfo", "utf8").catch(() => "");
  const mhz = Number(/^cpu MHz\s*:\s*([\d.]+)/m.exec(info)?.[1]);
  return Number.isFinite(mhz) && mhz > 0 ? Math.round(mhz * 1000) : 2_000_000;
}
