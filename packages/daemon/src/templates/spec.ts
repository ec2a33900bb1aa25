/**
 * A template: what a sandbox starts as. Its packages make its guest image (image/), its
 * modules are imported before its snapshot (pool/templates.ts), and its shape is what a
 * create that names no vcpu_count or mem_size_mib gets.
 */
import type { VmShape } from "../vm/backend.js";

export interface TemplateSpec {
  /** What POST /v1/sandboxes names in `template`. */
  name: string;
  /** Debian packages installed on top of minbase, in this order. */
  packages: readonly string[];
  /** Python modules imported while the template is made, so no sandbox pays for them. */
  warmModules: readonly string[];
  /** The shape of a sandbox that asks for none. */
  defaultShape: VmShape;
}
