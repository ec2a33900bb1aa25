/**
 * A sandbox's share of the host disk: its private overlay plus every frozen fork layer of
 * its chain (each counted in full for every sandbox whose chain holds it: a sandbox keeps
 * all of them alive, whoever else shares them). The template's disk at the bottom of every
 * chain is the host's, not the sandbox's. Sizes are what the files really occupy (qcow2
 * grows as the guest writes), not their virtual size.
 */
import { stat } from "node:fs/promises";

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
