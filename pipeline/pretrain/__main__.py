from ..cli import run
from .trainer import train

run("pretrain", train)
