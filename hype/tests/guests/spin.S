/* PVH ELF that writes the boot marker and then halts with interrupts off forever: a VM that only
 * ends when the host stops it. */
.section .note.pvh, "a"
  .align 4
  .long 4, 4, 18
  .asciz "Xen"
  .long pvh_start
.code32
.text
.globl pvh_start
pvh_start:
  mov $3, %al
  mov $0x440, %dx
  out %al, %dx
  cli
1: hlt
  jmp 1b
