/* ELF with a PVH note: entered in 32-bit protected mode with EBX = hvm_start_info.
 * Checks the magic, prints the command line and the memory map's last RAM entry end (MiB),
 * writes the boot marker port, and ends with a triple fault (empty IDT + int3). */
.section .note.pvh, "a"
  .align 4
  .long 4            /* namesz */
  .long 4            /* descsz */
  .long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
  .asciz "Xen"
  .long pvh_start

.code32
.text
.globl pvh_start
pvh_start:
  mov $0x8ff0, %esp           /* PVH gives no stack */
  mov $0x3f8, %dx
  cmpl $0x336ec578, (%ebx)
  jne bad
  lea msg_ok, %esi
  call puts
  mov 24(%ebx), %esi          /* cmdline_paddr (low 32 bits) */
  call puts
  mov $'\n', %al
  out %al, %dx
  /* last memory map entry: addr + size, in MiB, printed in decimal */
  mov 40(%ebx), %esi          /* memmap_paddr */
  mov 48(%ebx), %ecx          /* memmap_entries */
  dec %ecx
  imul $24, %ecx
  add %ecx, %esi
  mov (%esi), %eax
  add 8(%esi), %eax
  shr $20, %eax
  call putdec
  lea msg_mib, %esi
  call puts
  mov $7, %al
  mov $0x440, %dx
  out %al, %dx                /* boot marker 7 */
  lidt zero_idt
  int3                        /* no IDT: triple fault */
bad:
  lea msg_bad, %esi
  call puts
  hlt
puts:
  push %edx
  mov $0x3f8, %dx
1: lodsb
  test %al, %al
  jz 2f
  out %al, %dx
  jmp 1b
2: pop %edx
  ret
putdec:                        /* eax -> decimal on COM1 */
  mov $10, %ecx
  xor %edi, %edi
3: xor %edx, %edx
  div %ecx
  push %edx
  inc %edi
  test %eax, %eax
  jnz 3b
  mov $0x3f8, %dx
4: pop %eax
  add $'0', %al
  out %al, %dx
  dec %edi
  jnz 4b
  ret
.data
zero_idt: .word 0
  .long 0
msg_ok: .asciz "pvh ok, cmdline: "
msg_bad: .asciz "bad start_info magic\n"
msg_mib: .asciz " MiB\n"
