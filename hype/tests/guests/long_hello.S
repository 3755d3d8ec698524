/* 64-bit ELF entered in long mode (hype's ELF 64-bit entry, boot_params in RSI).
 * Prints a greeting and the zero page's e820 entry count, then resets through the i8042. */
.code64
.globl _start
.text
_start:
  mov %rsi, %rbx              /* boot_params */
  lea msg(%rip), %rsi
  call puts
  movzbl 0x1e8(%rbx), %eax    /* boot_params.e820_entries */
  add $'0', %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
1: hlt
  jmp 1b
puts:
  mov $0x3f8, %dx
2: lodsb
  test %al, %al
  jz 3f
  out %al, %dx
  jmp 2b
3: ret
msg: .asciz "hello from long mode, e820 entries: "
