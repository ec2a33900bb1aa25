/** What a QEMU VM costs the host beyond what its shape says. */
import { TCG_TB_SIZE_MIB } from "./qemu-args.js";

/**
 * QEMU's own memory beyond guest RAM, charged to the VM's group: the TCG translation
 * cache (bounded by tb-size) plus heap, device buffers, thread stacks and page tables.
 * Measured under TCG (docs/hardening.md): 30 to 60 MiB of non-guest RSS for a restored
 * 2-vCPU VM after some execs, with the translation cache still partly empty. 128 MiB on
 * top of the cache bound leaves room for block I/O bursts and migration buffers.
 */
export const QEMU_OVERHEAD_MIB = TCG_TB_SIZE_MIB + 128;
