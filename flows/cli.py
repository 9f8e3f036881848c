import typer
app = typer.Typer(help="wafer-fcn")
