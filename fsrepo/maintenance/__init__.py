"""Checking and cleaning a repository: `imgrepo-mount --verify [--data]` and `--gc`.

Both work on the bucket alone (no mount needed, none disturbed):

    walk      opening the repository, listing its blobs and manifests, running requests
              a few at a time: what verify and gc share
    verify    checking every manifest and blob (`verify`)
    gc        deleting blobs no manifest references, safely while others write (`collect`)
    report    the two commands: run one, print its report, choose the exit status
"""
