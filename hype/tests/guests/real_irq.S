/* Real-mode program loaded at 0x1000 with CS=0. Prints, programs the 8259 PIC (vectors 0x08..),
 * hooks IRQ4 (COM1) in the IVT, enables the UART's THRE interrupt and waits with hlt. The
 * handler prints and the program resets the machine through the i8042. */
.code16
.text
.globl _start
_start:
  xor %ax, %ax
  mov %ax, %ds
  mov %ax, %ss
  mov $0x7000, %sp
  mov $msg, %si
  call puts
  /* ICW1..ICW4 for the master PIC: edge, cascade, vector base 0x08, 8086 mode */
  mov $0x11, %al
  out %al, $0x20
  mov $0x08, %al
  out %al, $0x21
  mov $0x04, %al
  out %al, $0x21
  mov $0x01, %al
  out %al, $0x21
  mov $0xef, %al              /* unmask IRQ4 only */
  out %al, $0x21
  movw $handler, 0x0c*4       /* IVT[0x0c] = 0000:handler */
  movw $0, 0x0c*4+2
  sti
  mov $0x3f9, %dx             /* IER */
  mov $0x02, %al              /* THRE interrupt */
  out %al, %dx
1: hlt
  jmp 1b
handler:
  mov $irqmsg, %si
  call puts
  mov $0xfe, %al
  out %al, $0x64
puts:
  mov $0x3f8, %dx
2: lodsb
  test %al, %al
  jz 3f
  out %al, %dx
  jmp 2b
3: ret
msg: .asciz "real mode\n"
irqmsg: .asciz "irq 4 taken\n"
