// eellm command-line entry point: dispatches to subcommands.
#include "launch/commands.h"

int main(int argc, char** argv) { return eellm::RunCli(argc, argv); }
