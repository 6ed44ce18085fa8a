// The context switch of the CUDA emulation's fibers (cuda_emulation.h): a few instructions that
// swap callee-saved registers and the stack pointer (x86-64 System V), instead of swapcontext,
// which makes two system calls per switch for the signal mask. Test-only.
#pragma once

#include <cstddef>

extern "C" {
// Saves the running context's callee-saved registers on its stack and its stack pointer in
// *save_sp, then resumes the context whose saved stack pointer is `resume_sp`.
void eellm_emu_switch(void** save_sp, void* resume_sp);
}

namespace eellm_emu {

// A saved stack pointer on the fresh stack [stack, stack + size) that, when resumed, calls
// entry() (which must never return: it switches away for good instead).
void* PrepareFiberStack(char* stack, size_t size, void (*entry)());

}  // namespace eellm_emu
