/* Loaded at 0x8000. Offset 0: the AP entry (real mode, started by INIT/SIPI vector 0x08); each AP
 * atomically increments a counter at 0x7f00 and halts. At 0x8100: the BSP (long mode) sends
 * INIT and two SIPIs to all other CPUs through the local APIC, waits for the counter, prints
 * it, and resets through the i8042. */
.code16
.text
.globl _start
_start:
ap_entry:
  xor %ax, %ax
  mov %ax, %ds
  lock incw 0x7f00
4: cli
  hlt
  jmp 4b
.org 0x100
.code64
bsp_entry:
  movw $0, 0x7f00
  mov $0xfee00300, %rdi       /* ICR low */
  movl $0x000c4500, (%rdi)    /* INIT, all excluding self */
  mov $100000, %ecx
1: loop 1b
  movl $0x000c4608, (%rdi)    /* SIPI vector 0x08 -> 0x8000 */
  mov $100000, %ecx
2: loop 2b
  movl $0x000c4608, (%rdi)
  mov $200000000, %rcx        /* bounded wait */
  movzbl expected(%rip), %ebx
3: movzwl 0x7f00, %eax
  cmp %ebx, %eax
  je 5f
  dec %rcx
  jnz 3b
5: lea msg(%rip), %rsi
  mov $0x3f8, %dx
6: lodsb
  test %al, %al
  jz 7f
  out %al, %dx
  jmp 6b
7: movzwl 0x7f00, %eax
  add $'0', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
8: hlt
  jmp 8b
msg: .asciz "application processors up: "
.globl expected
expected: .byte 0
