/* PVH ELF that waits for the ACPI power button and then powers off: it polls the GED event
 * port (0x603, bit 0 = power button, cleared by the read) and writes SLP_TYP 5 | SLP_EN to
 * the sleep control port (0x600). Prints 'w' on COM1 first so the host knows it runs. */
.section .note.pvh, "a"
  .align 4
  .long 4, 4, 18
  .asciz "Xen"
  .long pvh_start
.code32
.text
.globl pvh_start
pvh_start:
  mov $0x3f8, %dx
  mov $'w', %al
  out %al, %dx
  mov $0x603, %dx
1: in %dx, %al
  test $1, %al
  jz 1b
  mov $0x600, %dx
  mov $0x34, %al
  out %al, %dx
2: hlt
  jmp 2b
