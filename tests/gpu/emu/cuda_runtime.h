// Shim for the CUDA emulation in tests (see cuda_emulation.h).
#pragma once
#include "cuda_emulation.h"
