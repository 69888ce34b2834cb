from dpsynth.cli.main import run

run()
