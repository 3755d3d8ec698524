/* The `hype demo` guest: a tiny polling virtio driver, entered in 64-bit long mode.
 *
 * hype loads this ELF like a 64-bit vmlinux: long mode, paging on with the first 4 GiB
 * identity-mapped (so guest-physical = virtual), interrupts off, RSI = boot_params (unused).
 * The program:
 *
 *   1. probes the ten virtio-mmio windows (0xd0000000 + n * 0x1000) for magic "virt",
 *      version 2, and takes the first block device (id 2) and console device (id 3);
 *   2. initialises the console (receiveq 0 and transmitq 1) and the block device (queue 0):
 *      reset, ACKNOWLEDGE, DRIVER, VERSION_1 as the only feature, FEATURES_OK, queues,
 *      DRIVER_OK;
 *   3. writes 8 sectors spread over the disk (sector i * capacity / 8), each with its own
 *      pattern, then reads them back into a poisoned buffer and compares;
 *   4. sends a one-line report through the console's transmitq and waits for the device to
 *      take it;
 *   5. resets the machine through the i8042 (port 0x64, command 0xfe).
 *
 * Every step is logged on the UART (COM1), so a broken console can still be diagnosed; the
 * last UART line is "hype demo guest: PASS" or "hype demo guest: FAIL". A failure after the
 * console is up is reported on the console too. Requests are synchronous: one chain at a time
 * (descriptors 0..2, head 0), completion found by polling the used index, with a time limit
 * measured with the TSC. No interrupts are used.
 */

.set COM1,           0x3f8
.set I8042_CMD,      0x64
.set I8042_RESET,    0xfe

/* virtio-mmio version 2 registers */
.set MMIO_BASE,      0xd0000000
.set MMIO_STRIDE,    0x1000
.set MMIO_WINDOWS,   10
.set R_MAGIC,        0x000
.set R_VERSION,      0x004
.set R_DEVICE_ID,    0x008
.set R_DEV_FEAT,     0x010
.set R_DEV_FEAT_SEL, 0x014
.set R_DRV_FEAT,     0x020
.set R_DRV_FEAT_SEL, 0x024
.set R_QUEUE_SEL,    0x030
.set R_QUEUE_MAX,    0x034
.set R_QUEUE_NUM,    0x038
.set R_QUEUE_READY,  0x044
.set R_QUEUE_NOTIFY, 0x050
.set R_STATUS,       0x070
.set R_DESC_LO,      0x080
.set R_DESC_HI,      0x084
.set R_AVAIL_LO,     0x090
.set R_AVAIL_HI,     0x094
.set R_USED_LO,      0x0a0
.set R_USED_HI,      0x0a4
.set R_CONFIG,       0x100
.set VIRT_MAGIC,     0x74726976      /* "virt" */

.set ID_BLOCK,       2
.set ID_CONSOLE,     3

/* device status bits */
.set S_ACKNOWLEDGE,  1
.set S_DRIVER,       2
.set S_FEATURES_OK,  8
.set S_DRIVER_OK,    4

/* split virtqueue: each queue gets three pages (descriptors, avail ring, used ring) */
.set QSIZE,          8
.set Q_DESC,         0x0000
.set Q_AVAIL,        0x1000
.set Q_USED,         0x2000
.set Q_BYTES,        0x3000
.set D_NEXT,         1
.set D_WRITE,        2

/* virtio-blk */
.set BLK_T_IN,       0
.set BLK_T_OUT,      1
.set SECTOR,         512
.set NSECT,          8

.set CON_RXQ,        0
.set CON_TXQ,        1

/* output sinks (see emit) */
.set SINK_UART,      1
.set SINK_MSG,       2
.set MSG_MAX,        256

/* a request not completed within 2^35 TSC ticks (about 10 s at 3 GHz) has timed out */
.set TIMEOUT_SHIFT,  35

.code64
.text
.globl _start
_start:
  cli
  lea stack_top(%rip), %rsp
  movb $SINK_UART, sink(%rip)
  lea s_hello(%rip), %rsi
  call puts

  call probe
  lea f_no_blk(%rip), %rsi
  test %r12, %r12
  jz fail
  lea f_no_con(%rip), %rsi
  test %r13, %r13
  jz fail

  /* The console first, so that later failures can be reported on it. */
  mov %r13, %rbx
  call dev_begin
  lea con_rxq(%rip), %rdi
  mov $CON_RXQ, %ecx
  call queue_setup
  lea con_txq(%rip), %rdi
  mov $CON_TXQ, %ecx
  call queue_setup
  call dev_driver_ok
  movb $1, con_ready(%rip)
  lea s_con_ready(%rip), %rsi
  call puts

  mov %r12, %rbx
  call dev_begin
  lea blk_q(%rip), %rdi
  xor %ecx, %ecx
  call queue_setup
  call dev_driver_ok
  mov R_CONFIG+4(%rbx), %eax        /* capacity: le64 in 512-byte sectors, config offset 0 */
  shl $32, %rax
  mov R_CONFIG(%rbx), %ecx
  or %rcx, %rax
  mov %rax, %r14
  lea s_blk_ready(%rip), %rsi
  call puts
  mov %r14, %rax
  call putdec
  lea s_sectors_nl(%rip), %rsi
  call puts
  lea f_small(%rip), %rsi
  mov %r14, %rax
  cmp $NSECT, %r14
  jb fail_num
  shr $3, %rax                      /* stride = capacity / 8 */
  mov %rax, stride(%rip)

  /* Write the 8 sectors... */
  xor %r15d, %r15d
1: call sector_of
  lea wbuf(%rip), %rdi
  call fill_pattern
  mov $BLK_T_OUT, %edi
  lea wbuf(%rip), %rdx
  call blk_request
  inc %r15d
  cmp $NSECT, %r15d
  jb 1b
  lea s_written(%rip), %rsi
  call puts

  /* ...then read each one back into a poisoned buffer and compare. */
  xor %r15d, %r15d
2: lea rbuf(%rip), %rdi
  mov $0xa5, %al
  mov $SECTOR, %ecx
  rep stosb
  call sector_of
  mov $BLK_T_IN, %edi
  lea rbuf(%rip), %rdx
  call blk_request
  call sector_of
  lea wbuf(%rip), %rdi
  call fill_pattern
  lea wbuf(%rip), %rsi
  lea rbuf(%rip), %rdi
  mov $SECTOR/8, %ecx
  repe cmpsq
  jne mismatch
  inc %r15d
  cmp $NSECT, %r15d
  jb 2b
  lea s_verified(%rip), %rsi
  call puts

  /* The report: on the UART and, through the transmitq, on the console. */
  movb $SINK_UART|SINK_MSG, sink(%rip)
  lea s_report1(%rip), %rsi
  call puts
  mov %r14, %rax
  call putdec
  lea s_report2(%rip), %rsi
  call puts
  movb $SINK_UART, sink(%rip)
  call con_send
  lea s_con_sent(%rip), %rsi
  call puts
  lea s_pass(%rip), %rsi
  call puts
  jmp reset

mismatch:
  call sector_of
  mov %rsi, %rax
  lea f_mismatch(%rip), %rsi
  jmp fail_num

/* ---------------------------------------------------------------------------------------
 * Failure: "hype demo: FAILED: <what>[<number>]" on the UART and, once the console is up, on
 * the console too; then "hype demo guest: FAIL" and reset. %rsi = message; fail_num also
 * prints %rax in decimal. Never returns. */
fail:
  mov $-1, %rax
fail_num:
  lea stack_top(%rip), %rsp         /* may come from any depth */
  push %rax
  push %rsi
  movl $0, msg_len(%rip)
  movb $SINK_UART, sink(%rip)
  cmpb $0, con_ready(%rip)
  je 1f
  movb $SINK_UART|SINK_MSG, sink(%rip)
  movb $0, con_ready(%rip)          /* a failure while sending this one goes to the UART only */
1: lea s_failed(%rip), %rsi
  call puts
  pop %rsi
  call puts
  pop %rax
  cmp $-1, %rax
  je 2f
  call putdec
2: lea s_crlf(%rip), %rsi
  call puts
  movb $SINK_UART, sink(%rip)
  testl $-1, msg_len(%rip)
  jz 3f
  call con_send
3: lea s_fail(%rip), %rsi
  call puts
reset:
  mov $I8042_RESET, %al
  out %al, $I8042_CMD
4: hlt
  jmp 4b

/* ---------------------------------------------------------------------------------------
 * Device discovery. Sets %r12 = first virtio-blk window, %r13 = first virtio-console window
 * (0 when absent) and logs every device found. */
probe:
  xor %r12d, %r12d
  xor %r13d, %r13d
  xor %r15d, %r15d                  /* window index */
1: mov %r15, %rax
  shl $12, %rax                     /* n * MMIO_STRIDE */
  mov $MMIO_BASE, %ebx              /* zero-extended: above 2^31, no sign-extended immediate */
  add %rax, %rbx
  cmpl $VIRT_MAGIC, R_MAGIC(%rbx)
  jne 4f
  cmpl $2, R_VERSION(%rbx)          /* modern virtio-mmio only */
  jne 4f
  mov R_DEVICE_ID(%rbx), %r8d
  test %r8d, %r8d                   /* id 0: an empty slot */
  jz 4f
  lea s_window(%rip), %rsi
  call puts
  mov %r15, %rax
  call putdec
  lea s_device_id(%rip), %rsi
  call puts
  mov %r8, %rax
  call putdec
  cmp $ID_BLOCK, %r8d
  jne 2f
  lea s_is_blk(%rip), %rsi
  call puts
  test %r12, %r12
  jnz 3f
  mov %rbx, %r12
  jmp 3f
2: cmp $ID_CONSOLE, %r8d
  jne 3f
  lea s_is_con(%rip), %rsi
  call puts
  test %r13, %r13
  jnz 3f
  mov %rbx, %r13
3: lea s_nl(%rip), %rsi
  call puts
4: inc %r15d
  cmp $MMIO_WINDOWS, %r15d
  jb 1b
  ret

/* ---------------------------------------------------------------------------------------
 * Device initialisation, %rbx = window: reset, ACKNOWLEDGE, DRIVER, accept VERSION_1 (feature
 * bit 32) and nothing else, FEATURES_OK. */
dev_begin:
  movl $0, R_STATUS(%rbx)
  lea f_reset(%rip), %rsi
  cmpl $0, R_STATUS(%rbx)
  jne fail
  movl $S_ACKNOWLEDGE, R_STATUS(%rbx)
  movl $S_ACKNOWLEDGE|S_DRIVER, R_STATUS(%rbx)
  movl $1, R_DEV_FEAT_SEL(%rbx)
  lea f_version1(%rip), %rsi
  testl $1, R_DEV_FEAT(%rbx)
  jz fail
  movl $0, R_DRV_FEAT_SEL(%rbx)
  movl $0, R_DRV_FEAT(%rbx)
  movl $1, R_DRV_FEAT_SEL(%rbx)
  movl $1, R_DRV_FEAT(%rbx)
  movl $S_ACKNOWLEDGE|S_DRIVER|S_FEATURES_OK, R_STATUS(%rbx)
  lea f_features(%rip), %rsi
  testl $S_FEATURES_OK, R_STATUS(%rbx)
  jz fail
  ret

/* %rbx = window: DRIVER_OK; the device must not ask for a reset. */
dev_driver_ok:
  movl $S_ACKNOWLEDGE|S_DRIVER|S_FEATURES_OK|S_DRIVER_OK, R_STATUS(%rbx)
  lea f_driver_ok(%rip), %rsi
  mov R_STATUS(%rbx), %eax
  and $0x4f, %eax                   /* the bits above plus DEVICE_NEEDS_RESET (0x40) */
  cmp $S_ACKNOWLEDGE|S_DRIVER|S_FEATURES_OK|S_DRIVER_OK, %eax
  jne fail
  ret

/* Queue %ecx of window %rbx, with its memory (Q_BYTES, page-aligned) at %rdi: zeroed, QSIZE
 * entries, addresses programmed, ready. */
queue_setup:
  movl %ecx, R_QUEUE_SEL(%rbx)
  lea f_queue_busy(%rip), %rsi
  cmpl $0, R_QUEUE_READY(%rbx)
  jne fail
  lea f_queue_small(%rip), %rsi
  cmpl $QSIZE, R_QUEUE_MAX(%rbx)
  jb fail
  push %rdi
  push %rcx
  xor %eax, %eax
  mov $Q_BYTES/8, %ecx
  rep stosq
  pop %rcx
  pop %rdi
  movl $QSIZE, R_QUEUE_NUM(%rbx)
  lea Q_DESC(%rdi), %rax
  movl %eax, R_DESC_LO(%rbx)
  shr $32, %rax
  movl %eax, R_DESC_HI(%rbx)
  lea Q_AVAIL(%rdi), %rax
  movl %eax, R_AVAIL_LO(%rbx)
  shr $32, %rax
  movl %eax, R_AVAIL_HI(%rbx)
  lea Q_USED(%rdi), %rax
  movl %eax, R_USED_LO(%rbx)
  shr $32, %rax
  movl %eax, R_USED_HI(%rbx)
  movl $1, R_QUEUE_READY(%rbx)
  ret

/* Makes the chain at descriptor 0 of queue %ecx (memory %rdi, window %rbx) available,
 * notifies the device and polls the used index until the device has returned it. */
queue_run:
  movzwl Q_AVAIL+2(%rdi), %r9d      /* avail.idx */
  mov %r9d, %eax
  and $QSIZE-1, %eax
  movw $0, Q_AVAIL+4(%rdi,%rax,2)   /* avail.ring[idx % QSIZE] = head 0 */
  inc %r9w
  movw %r9w, Q_AVAIL+2(%rdi)        /* publish: x86 keeps these two stores in order */
  mfence
  movl %ecx, R_QUEUE_NOTIFY(%rbx)
  rdtsc
  shl $32, %rdx
  or %rdx, %rax
  mov $1, %r10
  shl $TIMEOUT_SHIFT, %r10
  add %rax, %r10                    /* deadline */
1: cmpw %r9w, Q_USED+2(%rdi)        /* used.idx caught up? */
  je 2f
  pause
  rdtsc
  shl $32, %rdx
  or %rdx, %rax
  cmp %r10, %rax
  jb 1b
  lea f_timeout(%rip), %rsi
  jmp fail
2: ret

/* ---------------------------------------------------------------------------------------
 * virtio-blk. One request of type %edi (BLK_T_IN / BLK_T_OUT) for sector %rsi with the
 * 512-byte buffer %rdx: header, data, status (three descriptors); fails unless the device
 * returns status 0 (VIRTIO_BLK_S_OK). */
blk_request:
  lea blk_q(%rip), %r8
  movl %edi, blk_hdr(%rip)          /* type */
  movl $0, blk_hdr+4(%rip)          /* reserved */
  movq %rsi, blk_hdr+8(%rip)        /* sector */
  movb $0xff, blk_status(%rip)
  lea blk_hdr(%rip), %rax
  movq %rax, Q_DESC+0(%r8)
  movl $16, Q_DESC+8(%r8)
  movw $D_NEXT, Q_DESC+12(%r8)
  movw $1, Q_DESC+14(%r8)
  movq %rdx, Q_DESC+16(%r8)
  movl $SECTOR, Q_DESC+24(%r8)
  mov $D_NEXT|D_WRITE, %eax         /* the device writes the data of a read */
  cmp $BLK_T_IN, %edi
  je 1f
  mov $D_NEXT, %eax
1: movw %ax, Q_DESC+28(%r8)
  movw $2, Q_DESC+30(%r8)
  lea blk_status(%rip), %rax
  movq %rax, Q_DESC+32(%r8)
  movl $1, Q_DESC+40(%r8)
  movw $D_WRITE, Q_DESC+44(%r8)
  movw $0, Q_DESC+46(%r8)
  push %rsi
  mov %r12, %rbx
  mov %r8, %rdi
  xor %ecx, %ecx
  call queue_run
  pop %rax
  lea f_status(%rip), %rsi
  cmpb $0, blk_status(%rip)
  jne fail_num
  ret

/* %rsi = the disk sector of write number %r15 (%r15 * stride). */
sector_of:
  mov stride(%rip), %rsi
  imul %r15, %rsi
  ret

/* Fills the 512 bytes at %rdi for write number %r15 at sector %rsi: the sector number as a
 * le64, then bytes j + 37 * %r15 (so every write differs, whatever the stride). */
fill_pattern:
  mov %rsi, (%rdi)
  imul $37, %r15d, %eax
  mov $8, %ecx
1: lea (%rax,%rcx), %edx
  mov %dl, (%rdi,%rcx)
  inc %ecx
  cmp $SECTOR, %ecx
  jb 1b
  ret

/* ---------------------------------------------------------------------------------------
 * virtio-console: sends the msg_len bytes of msg_buf as one buffer on the transmitq and waits
 * until the device has taken them; empties the buffer. */
con_send:
  mov msg_len(%rip), %ecx
  test %ecx, %ecx
  jz 1f
  lea con_txq(%rip), %rdi
  lea msg_buf(%rip), %rax
  movq %rax, Q_DESC+0(%rdi)
  movl %ecx, Q_DESC+8(%rdi)
  movw $0, Q_DESC+12(%rdi)          /* device-readable, no next */
  movw $0, Q_DESC+14(%rdi)
  mov %r13, %rbx
  mov $CON_TXQ, %ecx
  call queue_run
  movl $0, msg_len(%rip)
1: ret

/* ---------------------------------------------------------------------------------------
 * Output. emit sends %al to the sinks selected by `sink`: the UART (a '\r' is left out
 * there) and/or msg_buf (the next console message, bytes beyond MSG_MAX dropped). puts
 * emits the zero-terminated string at %rsi; putdec emits %rax in decimal. Only %rax, %rsi
 * and the flags change. */
emit:
  push %rcx
  push %rdx
  testb $SINK_UART, sink(%rip)
  jz 1f
  cmp $'\r', %al
  je 1f
  mov $COM1, %dx
  out %al, %dx
1: testb $SINK_MSG, sink(%rip)
  jz 2f
  mov msg_len(%rip), %ecx
  cmp $MSG_MAX, %ecx
  jae 2f
  lea msg_buf(%rip), %rdx
  mov %al, (%rdx,%rcx)
  inc %ecx
  mov %ecx, msg_len(%rip)
2: pop %rdx
  pop %rcx
  ret

puts:
1: lodsb
  test %al, %al
  jz 2f
  call emit
  jmp 1b
2: ret

putdec:
  push %rcx
  push %rdx
  push %rdi
  lea dec_end(%rip), %rdi           /* digits are produced backwards */
  mov $10, %ecx
1: xor %edx, %edx
  div %rcx
  add $'0', %dl
  dec %rdi
  mov %dl, (%rdi)
  test %rax, %rax
  jnz 1b
  mov %rdi, %rsi                    /* dec_end holds the terminating zero */
  call puts
  pop %rdi
  pop %rdx
  pop %rcx
  ret

/* ---------------------------------------------------------------------------------------*/
.section .rodata
s_hello:      .asciz "hype demo guest: probing virtio-mmio windows\n"
s_window:     .asciz "  window "
s_device_id:  .asciz ": virtio device id "
s_is_blk:     .asciz " (block)"
s_is_con:     .asciz " (console)"
s_nl:         .asciz "\n"
s_crlf:       .asciz "\r\n"
s_con_ready:  .asciz "virtio-console ready\n"
s_blk_ready:  .asciz "virtio-blk ready, capacity "
s_sectors_nl: .asciz " sectors\n"
s_written:    .asciz "wrote 8 sectors\n"
s_verified:   .asciz "read back 8 sectors: data matches\n"
s_report1:    .asciz "hype demo: found virtio-blk ("
s_report2:    .asciz " sectors) and virtio-console; wrote and read back 8 sectors: OK\r\n"
s_con_sent:   .asciz "report sent on the virtio-console\n"
s_pass:       .asciz "hype demo guest: PASS\n"
s_failed:     .asciz "hype demo: FAILED: "
s_fail:       .asciz "hype demo guest: FAIL\n"
f_no_blk:     .asciz "no virtio-blk device found"
f_no_con:     .asciz "no virtio-console device found"
f_reset:      .asciz "device did not reset"
f_version1:   .asciz "device does not offer VERSION_1"
f_features:   .asciz "device refused the features"
f_driver_ok:  .asciz "device refused DRIVER_OK"
f_queue_busy: .asciz "queue already in use"
f_queue_small: .asciz "queue smaller than 8 entries"
f_timeout:    .asciz "device did not answer in time"
f_small:      .asciz "disk too small, sectors: "
f_status:     .asciz "block request failed at sector "
f_mismatch:   .asciz "data read back differs at sector "

.data
sink:         .byte 0
con_ready:    .byte 0
.balign 4
msg_len:      .long 0
.balign 8
stride:       .quad 0
dec_buf:      .fill 24, 1, 0
dec_end:      .byte 0

.bss
.balign 4096
blk_q:        .skip Q_BYTES
con_rxq:      .skip Q_BYTES
con_txq:      .skip Q_BYTES
wbuf:         .skip SECTOR
rbuf:         .skip SECTOR
blk_hdr:      .skip 16
blk_status:   .skip 1
.balign 16
msg_buf:      .skip MSG_MAX
.balign 16
stack:        .skip 16384
stack_top:
