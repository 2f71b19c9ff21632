import time

from prefect import flow


@flow
def sleeper(seconds: float = 3.0) -> None:
    time.sleep(seconds)
