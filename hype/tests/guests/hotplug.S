/* PVH guest that watches the hot-plug slot registers (ports 0x610-0x61f, see
 * vmm/src/devices/hotplug.rs) the way the ACPI GED's _EVT does: for a slot in INSERTED it prints
 * the slot, the virtio-mmio magic and the device ID read from the slot's window; for a slot in
 * REMOVE it prints the slot and ejects it (writes its index to EJECT). Runs forever. */
.section .note.pvh, "a"
  .align 4
  .long 4, 4, 18
  .asciz "Xen"
  .long pvh_start
.code32
.text
.globl pvh_start
pvh_start:
  mov $0x9000, %esp
  lea msg_ready, %esi
  call puts
watch:
  mov $0x614, %dx             /* INSERTED (read clears) */
  in %dx, %eax
  test %eax, %eax
  jz 2f
  bsf %eax, %ebx
  lea msg_ins, %esi
  call puts
  mov %ebx, %eax
  call puthex
  mov %ebx, %edi
  shl $12, %edi
  add $0xd0000000, %edi       /* the slot's virtio-mmio window */
  lea msg_magic, %esi
  call puts
  mov (%edi), %eax            /* MagicValue */
  call puthex
  lea msg_id, %esi
  call puts
  mov 8(%edi), %eax           /* DeviceID */
  call puthex
  call newline
2: mov $0x618, %dx            /* REMOVE (read clears) */
  in %dx, %eax
  test %eax, %eax
  jz watch
  bsf %eax, %ebx
  lea msg_rem, %esi
  call puts
  mov %ebx, %eax
  call puthex
  call newline
  mov $0x61c, %dx             /* EJECT */
  mov %ebx, %eax
  out %eax, %dx
  jmp watch

puts:                         /* string at esi; clobbers eax, edx, esi */
  mov $0x3f8, %dx
1: lodsb
  test %al, %al
  jz 2f
  out %al, %dx
  jmp 1b
2: ret
newline:
  mov $'\n', %al
  mov $0x3f8, %dx
  out %al, %dx
  ret
puthex:                       /* eax as 8 hex digits; clobbers eax, ecx, edx, esi */
  mov %eax, %esi
  mov $8, %ecx
  mov $0x3f8, %dx
1: rol $4, %esi
  mov %esi, %eax
  and $0xf, %eax
  mov hexdigits(%eax), %al
  out %al, %dx
  loop 1b
  ret
.data
hexdigits: .ascii "0123456789abcdef"
msg_ready: .asciz "hotplug guest ready\n"
msg_ins: .asciz "inserted "
msg_magic: .asciz " magic "
msg_id: .asciz " id "
msg_rem: .asciz "remove "
