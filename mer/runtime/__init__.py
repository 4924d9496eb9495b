"""The Ray runtime layer: process set-up (session), placement on the cluster, streams of stages, console."""
