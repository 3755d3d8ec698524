/* PVH ELF for the snapshot tests: counts ticks (one per 2^14 turns of a register loop) in memory
 * at TICKS and prints each as "Txxxxxxxx\n" (8 hex digits) on COM1. A guest restored from a
 * snapshot must go on with the next tick: its register loop, its memory and its place in the
 * printing all come from the snapshot. Writes boot marker 5 first. */
.set TICKS, 0x1f0000
.section .note.pvh, "a"
  .align 4
  .long 4, 4, 18
  .asciz "Xen"
  .long pvh_start
.code32
.text
.globl pvh_start
pvh_start:
  mov $5, %al
  mov $0x440, %dx
  out %al, %dx
  mov $0x3f8, %dx
  xor %ecx, %ecx
1: inc %ecx
  test $0x3fff, %ecx
  jnz 1b
  incl TICKS
  mov TICKS, %ebx
  mov $'T', %al
  out %al, %dx
  mov $8, %esi
2: rol $4, %ebx
  mov %bl, %al
  and $0xf, %al
  add $'0', %al
  cmp $'9', %al
  jbe 3f
  add $7, %al
3: out %al, %dx
  dec %esi
  jnz 2b
  mov $'\n', %al
  out %al, %dx
  jmp 1b
