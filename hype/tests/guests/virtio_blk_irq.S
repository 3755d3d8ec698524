/* An interrupt-driven virtio-blk driver in 64-bit long mode (raw image, identity-mapped).
 *
 * Initialises the virtio-mmio block device at 0xd0000000 (queue 0, 8 entries), programs the
 * 8259 PICs (vectors 0x20.., only IRQ 5 unmasked: the device's line), installs an IDT whose
 * vector 0x25 handler reads InterruptStatus, acknowledges it, counts used-buffer interrupts
 * and sends EOI. Then it writes and reads back 4 sectors, sleeping in hlt until each request
 * completes: completions are seen only through interrupts (the backend's irqfd).
 * Prints "interrupts 0x<n>, vring 0x<m>" and "irq ok", then resets. */
.code64
.text
.globl _start

.set DEV,     0xd0000000
.set DESC,    0x200000
.set AVAIL,   0x201000
.set USED,    0x202000
.set HDR,     0x210000
.set STATUS,  0x211000
.set WBUF,    0x220000
.set RBUF,    0x221000
.set IDT,     0x230000
.set COUNTS,  0x240000            /* +0 interrupts, +8 with the vring bit */
.set QSIZE,   8
.set VECTOR,  0x25                /* IRQ 5 */

_start:
  mov $DEV, %rbx
  movq $0, COUNTS
  movq $0, COUNTS+8
  cmpl $0x74726976, 0x00(%rbx)
  jne fail
  cmpl $2, 0x08(%rbx)
  jne fail
  movl $0, 0x70(%rbx)
  movl $1, 0x70(%rbx)
  movl $3, 0x70(%rbx)
  movl $0, 0x24(%rbx)
  movl $0, 0x20(%rbx)
  movl $1, 0x24(%rbx)
  movl $1, 0x20(%rbx)               /* VERSION_1 only */
  movl $0xb, 0x70(%rbx)
  testl $8, 0x70(%rbx)
  jz fail
  movl $0, 0x30(%rbx)
  movl $QSIZE, 0x38(%rbx)
  movl $DESC, 0x80(%rbx)
  movl $0, 0x84(%rbx)
  movl $AVAIL, 0x90(%rbx)
  movl $0, 0x94(%rbx)
  movl $USED, 0xa0(%rbx)
  movl $0, 0xa4(%rbx)
  movl $1, 0x44(%rbx)

  /* PICs: ICW1..4, master vectors 0x20, slave 0x28; mask all but IRQ 5. */
  mov $0x11, %al
  out %al, $0x20
  out %al, $0xa0
  mov $0x20, %al
  out %al, $0x21
  mov $0x28, %al
  out %al, $0xa1
  mov $0x04, %al
  out %al, $0x21
  mov $0x02, %al
  out %al, $0xa1
  mov $0x01, %al
  out %al, $0x21
  out %al, $0xa1
  mov $0xdf, %al
  out %al, $0x21
  mov $0xff, %al
  out %al, $0xa1

  /* IDT gate for VECTOR: 64-bit interrupt gate to `handler`. */
  lea handler(%rip), %rax
  mov $IDT + VECTOR*16, %rdi
  mov %ax, (%rdi)                   /* offset 15:0 */
  mov %cs, %dx
  mov %dx, 2(%rdi)                  /* selector */
  movw $0x8e00, 4(%rdi)             /* present, DPL 0, interrupt gate */
  shr $16, %rax
  mov %ax, 6(%rdi)                  /* offset 31:16 */
  shr $16, %rax
  mov %eax, 8(%rdi)                 /* offset 63:32 */
  movl $0, 12(%rdi)
  lea idtr(%rip), %rax
  lidt (%rax)

  movl $0xf, 0x70(%rbx)             /* DRIVER_OK */

  xor %r12d, %r12d
1: mov %r12, %rdi
  call fill_pattern
  mov $1, %edi
  mov %r12, %rsi
  mov $WBUF, %edx
  call request
  mov $0, %edi
  mov %r12, %rsi
  mov $RBUF, %edx
  call request
  mov $WBUF, %esi
  mov $RBUF, %edi
  mov $512, %ecx
  repe cmpsb
  jne fail
  inc %r12d
  cmp $4, %r12d
  jb 1b

  cli
  lea m_count(%rip), %rsi
  call puts
  mov COUNTS, %rax
  call puthex
  lea m_vring(%rip), %rsi
  call puts
  mov COUNTS+8, %rax
  call puthex
  lea m_ok(%rip), %rsi
  call puts
  jmp reset

handler:
  push %rax
  push %rbx
  mov $DEV, %rbx
  mov 0x60(%rbx), %eax              /* InterruptStatus */
  mov %eax, 0x64(%rbx)              /* InterruptACK */
  incq COUNTS
  test $1, %eax
  jz 2f
  incq COUNTS+8
2: mov $0x20, %al
  out %al, $0x20                    /* EOI */
  pop %rbx
  pop %rax
  iretq

fill_pattern:
  xor %ecx, %ecx
  imul $13, %edi, %eax
3: lea (%rax,%rcx), %edx
  mov %dl, WBUF(%rcx)
  inc %ecx
  cmp $512, %ecx
  jb 3b
  ret

/* One request: type %edi, sector %rsi, buffer %rdx; sleeps until its completion. */
request:
  movl %edi, HDR
  movl $0, HDR+4
  movq %rsi, HDR+8
  movb $0xff, STATUS
  movq $HDR, DESC
  movl $16, DESC+8
  movw $1, DESC+12
  movw $1, DESC+14
  movq %rdx, DESC+16
  movl $512, DESC+24
  mov $3, %eax
  test %edi, %edi
  jz 4f
  mov $1, %eax
4: movw %ax, DESC+28
  movw $2, DESC+30
  movq $STATUS, DESC+32
  movl $1, DESC+40
  movw $2, DESC+44
  movw $0, DESC+46
  movzwl AVAIL+2, %eax
  mov %eax, %ecx
  and $QSIZE-1, %ecx
  movw $0, AVAIL+4(,%rcx,2)
  inc %eax
  movw %ax, AVAIL+2
  mfence
  movl $0, 0x50(%rbx)               /* QueueNotify */
5: cli
  movzwl USED+2, %ecx
  cmp %ax, %cx
  je 6f
  sti
  hlt                               /* only an interrupt wakes us */
  jmp 5b
6: sti
  cmpb $0, STATUS
  jne fail
  ret

fail:
  cli
  lea m_fail(%rip), %rsi
  call puts
.include "serial.inc"

.balign 8
idtr:      .word 256*16-1
           .quad IDT
m_count:   .asciz "interrupts 0x"
m_vring:   .asciz ", vring 0x"
m_ok:      .asciz "\nirq ok\n"
m_fail:    .asciz "irq test failed\n"
