// x86-64 System V context switch for the CUDA emulation's fibers (see fiber_switch.h).
#include "tests/gpu/emu/fiber_switch.h"

#include <cstdint>

#if !defined(__x86_64__)
#error "the CUDA emulation's fibers are written for x86-64"
#endif

asm(R"(
  .text
  .globl eellm_emu_switch
  .type eellm_emu_switch, @function
eellm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size eellm_emu_switch, .-eellm_emu_switch
  .section .note.GNU-stack, "", @progbits
  .text
)");

namespace eellm_emu {

void* PrepareFiberStack(char* stack, size_t size, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                              // entry's return address (never used)
  *--sp = reinterpret_cast<void*>(entry);       // where eellm_emu_switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  return sp;  // entry then starts with rsp = top - 8, as after a call
}

}  // namespace eellm_emu
