from prefect import flow


@flow
def hog(megabytes: int = 300) -> None:
    data = b"x" * (megabytes << 20)  # written, so resident
    print(len(data))
