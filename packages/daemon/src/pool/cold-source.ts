/** The simplest VM source: every sandbox is a cold boot of the image. */
import { randomBytes } from "node:crypto";
import type { VmSource } from "../sandboxes/service.js";
import type { VmEngine } from "../vm/engine.js";
import type { VmShape } from "../vm/qemu-args.js";
import type { Vm } from "../vm/vm.js";

export const DEFAULT_TEMPLATE = "default";

export class ColdBootSource implements VmSource {
  constructor(private readonly engine: VmEngine) {}

  acquire(_template: string, shape: VmShape): Promise<Vm> {
    return this.engine.boot(`vm_${randomBytes(6).toString("hex")}`, shape);
  }

  templates(): readonly string[] {
    return [DEFAULT_TEMPLATE];
  }
}
