// moe: the command-line front end. Verbs land with the trainer issue.
#include <CLI/CLI.hpp>
#include <cstdio>

int main(int argc, char** argv) {
  CLI::App app{"moe: train, sample and evaluate character-level sparse MoE language models"};
  app.require_subcommand(1);
  app.add_subcommand("train", "train a model from a JSON config (not implemented yet)");
  CLI11_PARSE(app, argc, argv);
  std::fprintf(stderr, "moe: this verb is not implemented yet\n");
  return 2;
}
