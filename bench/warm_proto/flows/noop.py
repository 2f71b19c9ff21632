from prefect import flow


@flow
def noop() -> None:
    pass
