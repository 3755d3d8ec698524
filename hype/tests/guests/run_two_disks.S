/* Guest for the `hype run` tests: a 64-bit ELF (hype's long-mode entry, first 4 GiB identity
 * mapped) driving two virtio-blk devices by polling, at 0xd0000000 (disk0) and 0xd0001000
 * (disk1); a third device, if any, is left alone.
 *
 *   disk1: sectors 0..15 written with a pattern, read back and compared -> "disk1 ok"
 *   disk0: sector 0 must start with "HYPE" (the test writes it) -> "disk0 ok"
 *   then "waiting", and disk0 sector 1 is read until it starts with "GO!!" (the test writes
 *   it, possibly after killing and restarting backends); then "DONE" is written to disk0
 *   sector 2, "done" is printed and the machine resets through the i8042.
 * Any failure prints a message and resets. */
.code64
.text
.globl _start

.set DEV0,   0xd0000000
.set DEV1,   0xd0001000
.set RING0,  0x400000          /* desc +0, avail +0x1000, used +0x2000, hdr +0x3000, status +0x3100 */
.set RING1,  0x500000
.set WBUF,   0x600000
.set RBUF,   0x601000
.set QSIZE,  8

_start:
  mov $0x300000, %rsp
  lea hello(%rip), %rsi
  call puts
  mov $DEV0, %rbx
  call init_dev
  mov $DEV1, %rbx
  call init_dev

  /* disk1: write/read/compare sectors 0..15 */
  mov $DEV1, %rbx
  mov $RING1, %r13
  xor %r12d, %r12d
1: call fill_pattern
  mov $1, %edi
  mov %r12, %rsi
  mov $WBUF, %edx
  call request
  mov $0, %edi
  mov %r12, %rsi
  mov $RBUF, %edx
  call request
  call compare
  inc %r12d
  cmp $16, %r12d
  jb 1b
  lea m_disk1(%rip), %rsi
  call puts

  /* disk0: sector 0 starts with HYPE */
  mov $DEV0, %rbx
  mov $RING0, %r13
  xor %r12d, %r12d
  mov $0, %edi
  xor %esi, %esi
  mov $RBUF, %edx
  call request
  cmpl $0x45505948, RBUF            /* "HYPE" */
  jne bad_sector0
  lea m_disk0(%rip), %rsi
  call puts

  lea m_wait(%rip), %rsi
  call puts
  mov $1, %r12d
2: mov $0, %edi
  mov $1, %esi
  mov $RBUF, %edx
  call request
  cmpl $0x21214f47, RBUF            /* "GO!!" */
  jne 2b

  movl $0x454e4f44, WBUF            /* "DONE" */
  mov $2, %r12d
  mov $1, %edi
  mov $2, %esi
  mov $WBUF, %edx
  call request
  lea m_done(%rip), %rsi
  call puts
  jmp reset

/* Standard initialisation of the block device at %rbx with one queue of QSIZE; the rings
 * are at RING0 for DEV0 and RING1 for DEV1. */
init_dev:
  mov $RING0, %r13
  cmp $DEV0, %ebx
  je 3f
  mov $RING1, %r13
3: cmpl $0x74726976, 0x00(%rbx)    /* "virt" */
  jne no_device
  cmpl $2, 0x04(%rbx)
  jne no_device
  cmpl $2, 0x08(%rbx)               /* block */
  jne no_device
  movl $0, 0x70(%rbx)
  movl $1, 0x70(%rbx)
  movl $3, 0x70(%rbx)
  movl $1, 0x14(%rbx)
  testl $1, 0x10(%rbx)              /* VERSION_1 */
  jz bad_features
  movl $0, 0x24(%rbx)
  movl $0, 0x20(%rbx)
  movl $1, 0x24(%rbx)
  movl $1, 0x20(%rbx)
  movl $0xb, 0x70(%rbx)
  testl $8, 0x70(%rbx)
  jz bad_features
  movl $0, 0x30(%rbx)
  cmpl $QSIZE, 0x34(%rbx)
  jb bad_features
  movl $QSIZE, 0x38(%rbx)
  mov %r13, %rax
  movl %eax, 0x80(%rbx)
  movl $0, 0x84(%rbx)
  add $0x1000, %eax
  movl %eax, 0x90(%rbx)
  movl $0, 0x94(%rbx)
  add $0x1000, %eax
  movl %eax, 0xa0(%rbx)
  movl $0, 0xa4(%rbx)
  movl $1, 0x44(%rbx)
  movl $0xf, 0x70(%rbx)
  ret

/* WBUF[j] = sector*5 + j (sector in %r12). */
fill_pattern:
  xor %ecx, %ecx
  imul $5, %r12d, %eax
4: lea (%rax,%rcx), %edx
  mov %dl, WBUF(%rcx)
  inc %ecx
  cmp $512, %ecx
  jb 4b
  ret

compare:
  mov $WBUF, %esi
  mov $RBUF, %edi
  mov $512, %ecx
  repe cmpsb
  jne mismatch
  ret

/* One request on device %rbx with rings at %r13: type %edi (0 IN, 1 OUT), sector %rsi,
 * buffer %rdx (512 bytes). Polls the used ring; fails unless the status byte is 0. */
request:
  movl %edi, 0x3000(%r13)
  movl $0, 0x3004(%r13)
  movq %rsi, 0x3008(%r13)
  movb $0xff, 0x3100(%r13)
  lea 0x3000(%r13), %rax
  movq %rax, 0(%r13)
  movl $16, 8(%r13)
  movw $1, 12(%r13)
  movw $1, 14(%r13)
  movq %rdx, 16(%r13)
  movl $512, 24(%r13)
  mov $3, %eax
  test %edi, %edi
  jz 5f
  mov $1, %eax
5: movw %ax, 28(%r13)
  movw $2, 30(%r13)
  lea 0x3100(%r13), %rax
  movq %rax, 32(%r13)
  movl $1, 40(%r13)
  movw $2, 44(%r13)
  movw $0, 46(%r13)
  movzwl 0x1002(%r13), %eax         /* avail idx */
  mov %eax, %ecx
  and $QSIZE-1, %ecx
  movw $0, 0x1004(%r13,%rcx,2)
  inc %eax
  movw %ax, 0x1002(%r13)
  mfence
  movl $0, 0x50(%rbx)               /* QueueNotify */
6: movzwl 0x2002(%r13), %ecx        /* used idx */
  cmp %ax, %cx
  je 7f
  pause
  jmp 6b
7: cmpb $0, 0x3100(%r13)
  jne bad_status
  ret

no_device:    lea m_nodev(%rip), %rsi
              jmp fail
bad_features: lea m_feat(%rip), %rsi
              jmp fail
bad_status:   lea m_status(%rip), %rsi
              jmp fail
bad_sector0:  lea m_sector0(%rip), %rsi
              jmp fail
mismatch:     lea m_mismatch(%rip), %rsi
fail:
  call puts
.include "serial.inc"

hello:      .asciz "run guest\n"
m_disk1:    .asciz "disk1 ok\n"
m_disk0:    .asciz "disk0 ok\n"
m_wait:     .asciz "waiting\n"
m_done:     .asciz "done\n"
m_nodev:    .asciz "no virtio-blk device\n"
m_feat:     .asciz "feature negotiation failed\n"
m_status:   .asciz "request failed\n"
m_sector0:  .asciz "disk0 sector 0 is not HYPE\n"
m_mismatch: .asciz "disk1 data mismatch\n"
