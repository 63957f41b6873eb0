from instructrl.main import cli

cli()
