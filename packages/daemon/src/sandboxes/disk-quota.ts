/**
 * A sandbox's share of the host disk: its private overlay plus every frozen fork layer of
 * its chain (each counted in full for every sandbox whose chain holds it: a sandbox keeps
 * all of them alive, whoever else shares them). The template's disk at the bottom of every
 * chain is the host's, not the sandbox's. Sizes are what the files really occupy (qcow2
 * grows as the guest writes), not their virtual size.
 */
import { stat } from "node:fs/promises";
import type { Logger } from "../util/logger.js";
import type { VmHandle as Vm } from "../vm/backend.js";
import { OverLimitError } from "./errors.js";

export async function chainUsageMib(chain: readonly string[]): Promise<number> {
  let bytes = 0;
  for (const path of chain) {
    const st = await stat(path).catch(() => null);
    if (st) bytes += st.blocks * 512;
  }
  return Math.ceil(bytes / 2 ** 20);
}

/** Whether a sandbox holding `usageMib` may fork under a limit of `limitMib`. */
export function mayFork(usageMib: number, limitMib: number): boolean {
  return usageMib <= limitMib;
}

/**
 * A fork freezes the parent's disk into a layer its children share; past the per-sandbox
 * disk limit the parent's layers are merged first (`flatten`, which frees those only it
 * held), and if it is still over, the fork is refused: nothing is made.
 */
export async function checkForkDiskLimit(
  id: string,
  vm: Vm,
  limitMib: number | undefined,
  flatten: ((vm: Vm) => Promise<void>) | undefined,
  log: Logger,
): Promise<void> {
  if (limitMib === undefined) return;
  let usage = await chainUsageMib(vm.diskChain);
  if (!mayFork(usage, limitMib) && vm.diskChain.length > 1 && flatten) {
    await flatten(vm);
    usage = await chainUsageMib(vm.diskChain);
  }
  if (!mayFork(usage, limitMib)) {
    log.warn({ sandbox: id, usageMib: usage, limitMib }, "fork refused: disk limit");
    throw new OverLimitError(
      `sandbox ${id} holds ${usage} MiB of host disk (its overlay plus the fork layers it keeps), over the per-sandbox limit of ${limitMib} MiB: it cannot be forked; write less to its disk, or fork from a sandbox that holds less`,
    );
  }
}
