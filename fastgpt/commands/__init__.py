"""One module per `fastgpt` subcommand: add_arguments(parser) and run(args)."""
