/* PVH ELF that writes the boot marker port 50,000 times in a loop (a guest trying to flood the
 * VMM's log), then resets through the i8042. */
.section .note.pvh, "a"
  .align 4
  .long 4, 4, 18
  .asciz "Xen"
  .long pvh_start
.code32
.text
.globl pvh_start
pvh_start:
  mov $50000, %ecx
  mov $0x440, %dx
1: mov %ecx, %eax
  out %eax, %dx
  loop 1b
  mov $0xfe, %al
  out %al, $0x64
  cli
2: hlt
  jmp 2b
