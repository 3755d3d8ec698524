/* Start-up benchmark guest: a PVH ELF whose first instruction writes the boot marker (port
 * 0x440, value 1), then resets: i8042 0xFE for hype, isa-debug-exit at 0xf4 for QEMU. */
.section .note.pvh, "a"
  .align 4
  .long 4, 4, 18
  .asciz "Xen"
  .long pvh_start
.code32
.text
.globl pvh_start
pvh_start:
  mov $1, %al
  mov $0x440, %dx
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
  out %al, $0xf4
1: hlt
  jmp 1b
