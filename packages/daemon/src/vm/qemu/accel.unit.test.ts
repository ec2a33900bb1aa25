import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { chooseAccel, type HostProbe } from "./accel.js";

function probe(over: Partial<{ kvm: boolean; flags: string; pvm: boolean; boots: boolean }>) {
  const calls: string[] = [];
  const p: HostProbe = {
    kvmDevice: async () => over.kvm ?? true,
    cpuFlags: async () => `flags\t\t: fpu ${over.flags ?? "vmx"} sse\n`,
    pvmModule: async () => over.pvm ?? false,
    bootUnderKvm: async () => {
      calls.push("boot");
      return over.boots ?? true;
    },
  };
  return { p, calls };
}

describe("accelerator choice", () => {
  it("picks TCG at once on a PVM-like host: /dev/kvm but no vmx/svm, no boot attempted", async () => {
    const { p, calls } = probe({ flags: "hypervisor" });
    const d = await chooseAccel("auto", p);
    assert.equal(d.accel, "tcg");
    assert.match(d.reason, /vmx\/svm/);
    assert.deepEqual(calls, []);
  });

  it("picks TCG when the KVM module is kvm_pvm", async () => {
    assert.equal((await chooseAccel("auto", probe({ pvm: true }).p)).accel, "tcg");
  });

  it("picks TCG without /dev/kvm, and KVM only after a guest really booted", async () => {
    assert.equal((await chooseAccel("auto", probe({ kvm: false }).p)).accel, "tcg");
    const ok = probe({});
    assert.equal((await chooseAccel("auto", ok.p)).accel, "kvm");
    assert.deepEqual(ok.calls, ["boot"]);
    assert.equal((await chooseAccel("auto", probe({ boots: false }).p)).accel, "tcg");
  });

  it("honours the override, and refuses kvm without a device", async () => {
    assert.equal((await chooseAccel("tcg", probe({}).p)).accel, "tcg");
    assert.equal((await chooseAccel("kvm", probe({ flags: "none" }).p)).accel, "kvm");
    await assert.rejects(chooseAccel("kvm", probe({ kvm: false }).p), /PODFLARE_ACCEL=kvm/);
  });
});
