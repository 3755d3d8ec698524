/* PVH ELF that counts forever and prints a '.' on COM1 every 2^14 iterations: a guest whose
 * progress the host can watch (the serial output grows while its vCPU runs, stops while it is
 * paused). Writes boot marker 5 first. */
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
  mov $'.', %al
  out %al, %dx
  jmp 1b
