/* A polling virtio-blk driver, entered in 64-bit long mode (raw image, identity-mapped).
 *
 * Finds the virtio-mmio device at 0xd0000000, runs the standard driver initialisation
 * (reset, ACKNOWLEDGE, DRIVER, features with VERSION_1, FEATURES_OK, queue 0 of 8 entries,
 * DRIVER_OK), prints the capacity, then writes and reads back sectors 0..63 (each with its
 * own pattern). With `mailbox` set, it prints "waiting" after the first 32 sectors and reads
 * sector 1000 until it starts with "GO!!" (the host kills and restarts the backend meanwhile
 * and writes GO!! into the image). At the end every sector is read back again and the used
 * index is checked against the number of requests (a duplicate completion would show).
 * Output goes to COM1; the program resets the machine through the i8042.
 * Queue notifications are MMIO writes to QueueNotify (the VMM's ioeventfd takes them). */
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
.set QSIZE,   8
.set NSECT,   64
.set MAILBOX_SECTOR, 1000

_start:
  mov $DEV, %rbx
  lea hello(%rip), %rsi
  call puts
  cmpl $0x74726976, 0x00(%rbx)      /* MagicValue "virt" */
  jne no_device
  cmpl $2, 0x04(%rbx)               /* Version 2 */
  jne no_device
  cmpl $2, 0x08(%rbx)               /* DeviceID: block */
  jne no_device

  movl $0, 0x70(%rbx)               /* reset */
  movl $1, 0x70(%rbx)               /* ACKNOWLEDGE */
  movl $3, 0x70(%rbx)               /* DRIVER */
  movl $1, 0x14(%rbx)               /* DeviceFeaturesSel = 1 */
  testl $1, 0x10(%rbx)              /* VERSION_1 (bit 32) */
  jz bad_features
  movl $0, 0x24(%rbx)
  movl $0, 0x20(%rbx)               /* no device-specific features */
  movl $1, 0x24(%rbx)
  movl $1, 0x20(%rbx)               /* VERSION_1 */
  movl $0xb, 0x70(%rbx)             /* FEATURES_OK */
  testl $8, 0x70(%rbx)
  jz bad_features
  movl $0, 0x30(%rbx)               /* QueueSel 0 */
  cmpl $QSIZE, 0x34(%rbx)           /* QueueNumMax */
  jb bad_queue
  movl $QSIZE, 0x38(%rbx)
  movl $DESC, 0x80(%rbx)
  movl $0, 0x84(%rbx)
  movl $AVAIL, 0x90(%rbx)
  movl $0, 0x94(%rbx)
  movl $USED, 0xa0(%rbx)
  movl $0, 0xa4(%rbx)
  movl $1, 0x44(%rbx)               /* QueueReady */
  movl $0xf, 0x70(%rbx)             /* DRIVER_OK */

  lea capmsg(%rip), %rsi
  call puts
  mov 0x100(%rbx), %rax             /* capacity (sectors), config offset 0 */
  call puthex
  call newline

  xor %r12d, %r12d                  /* sector */
1: cmp $32, %r12d
  jne 2f
  cmpb $0, mailbox(%rip)
  je 2f
  call wait_mailbox
2: mov %r12, %rdi
  call write_check
  inc %r12d
  cmp $NSECT, %r12d
  jb 1b
  call newline

  xor %r12d, %r12d                  /* verify everything again */
3: mov %r12, %rdi
  call fill_pattern
  mov $0, %edi                      /* IN */
  mov %r12, %rsi
  mov $RBUF, %edx
  call request
  call compare
  inc %r12d
  cmp $NSECT, %r12d
  jb 3b

  movzwl USED+2, %eax               /* every request completed exactly once */
  cmpw %ax, AVAIL+2
  jne bad_used
  push %rax
  lea okmsg(%rip), %rsi
  call puts
  pop %rax
  call puthex
  call newline
  jmp reset

/* Writes sector %rdi with its pattern, reads it back, compares; prints a dot. */
write_check:
  push %rdi
  call fill_pattern
  mov $1, %edi                      /* OUT */
  mov (%rsp), %rsi
  mov $WBUF, %edx
  call request
  mov $0, %edi                      /* IN */
  pop %rsi
  mov $RBUF, %edx
  call request
  call compare
  mov $'.', %al
  mov $0x3f8, %dx
  out %al, %dx
  ret

/* Reads the mailbox sector until it starts with "GO!!". */
wait_mailbox:
  lea waitmsg(%rip), %rsi
  call puts
4: mov $0, %edi
  mov $MAILBOX_SECTOR, %esi
  mov $RBUF, %edx
  call request
  cmpl $0x21214f47, RBUF           /* "GO!!" */
  jne 4b
  lea gomsg(%rip), %rsi
  call puts
  ret

/* WBUF[j] = sector*7 + j for j < 512 (sector in %rdi). */
fill_pattern:
  xor %ecx, %ecx
  imul $7, %edi, %eax
5: lea (%rax,%rcx), %edx
  mov %dl, WBUF(%rcx)
  inc %ecx
  cmp $512, %ecx
  jb 5b
  ret

/* RBUF must equal WBUF. */
compare:
  mov $WBUF, %esi
  mov $RBUF, %edi
  mov $512, %ecx
  repe cmpsb
  jne mismatch
  ret

/* One request: type %edi (0 IN, 1 OUT), sector %rsi, buffer %rdx (512 bytes).
 * Fails unless the status byte is 0. */
request:
  movl %edi, HDR
  movl $0, HDR+4
  movq %rsi, HDR+8
  movb $0xff, STATUS
  movq $HDR, DESC
  movl $16, DESC+8
  movw $1, DESC+12                  /* NEXT */
  movw $1, DESC+14
  movq %rdx, DESC+16
  movl $512, DESC+24
  mov $3, %eax                      /* NEXT | WRITE for IN */
  test %edi, %edi
  jz 6f
  mov $1, %eax                      /* NEXT for OUT */
6: movw %ax, DESC+28
  movw $2, DESC+30
  movq $STATUS, DESC+32
  movl $1, DESC+40
  movw $2, DESC+44                  /* WRITE */
  movw $0, DESC+46
  movzwl AVAIL+2, %eax
  mov %eax, %ecx
  and $QSIZE-1, %ecx
  movw $0, AVAIL+4(,%rcx,2)         /* head 0 */
  inc %eax
  movw %ax, AVAIL+2                 /* publish (x86 keeps the stores in order) */
  mfence
  movl $0, 0x50(%rbx)               /* QueueNotify: queue 0 */
  mov $0x40000000, %r8              /* bounded wait */
7: movzwl USED+2, %ecx
  cmp %ax, %cx
  je 8f
  pause
  dec %r8
  jnz 7b
  jmp timeout
8: cmpb $0, STATUS
  jne bad_status
  ret

no_device:    lea m_nodev(%rip), %rsi
              jmp fail
bad_features: lea m_feat(%rip), %rsi
              jmp fail
bad_queue:    lea m_queue(%rip), %rsi
              jmp fail
bad_status:   lea m_status(%rip), %rsi
              jmp fail
bad_used:     lea m_used(%rip), %rsi
              jmp fail
mismatch:     lea m_mismatch(%rip), %rsi
              jmp fail
timeout:      lea m_timeout(%rip), %rsi
fail:
  call puts
  mov %r12, %rax
  call puthex
  call newline
.include "serial.inc"

hello:     .asciz "virtio-blk guest\n"
capmsg:    .asciz "capacity 0x"
waitmsg:   .asciz "\nwaiting\n"
gomsg:     .asciz "go\n"
okmsg:     .asciz "all sectors ok, used idx 0x"
m_nodev:   .asciz "no virtio-blk device at 0xd0000000 "
m_feat:    .asciz "feature negotiation failed "
m_queue:   .asciz "queue 0 too small "
m_status:  .asciz "\nrequest failed at sector 0x"
m_used:    .asciz "\nused index does not match the requests "
m_mismatch: .asciz "\ndata mismatch at sector 0x"
m_timeout: .asciz "\nrequest timed out at sector 0x"
.globl mailbox
mailbox:   .byte 0
