"""Parsing `scontrol show job -o` output; needs no cluster."""

from tests.slurm.cluster import parse_scontrol_record


def test_values_with_spaces_and_equals_signs() -> None:
    line = (
        "JobId=7 JobName=train.sh JobState=PENDING Reason=ReqNodeNotAvail, UnavailableNodes:node2 "
        "Dependency=(null) Restarts=1 TRES=cpu=2,node=1,billing=2 Socks/Node=* "
        "Command=/work/jobs/train.sh --resume auto StdOut=/work/jobs/slurm-7.out Power=\n"
    )
    record = parse_scontrol_record(line)
    assert record["JobId"] == "7"
    assert record["Reason"] == "ReqNodeNotAvail, UnavailableNodes:node2"
    assert record["TRES"] == "cpu=2,node=1,billing=2"
    assert record["Socks/Node"] == "*"
    assert record["Command"] == "/work/jobs/train.sh --resume auto"
    assert record["StdOut"] == "/work/jobs/slurm-7.out"
    assert record["Power"] == ""
