"""The fault suite: real components (Ray local and ``ray.cluster_utils.Cluster``, S3 servers and an MLflow
server on 127.0.0.1, a tmpfs) faulted while the product works on them.

After each fault the output is identical to a clean run's (compared byte for byte), or the command ended with
one ``error:`` paragraph, exit 2, and nothing of it is visible; then a rerun completes. Run it with
``python -m pytest -q tests/faults`` (docs/RESULTS.md "Fault suite" lists the cases and their outcome).

Cases that live next to the code they exercise, and belong to this suite too:

* worker killed (its item re-run and counted): tests/test_executor.py::test_an_item_whose_worker_died_is_rerun_and_counted
* node killed mid-build (a shard in flight on it, re-run on the head, retries counted):
  tests/test_distributed_build.py::test_worker_node_killed_mid_build
* driver SIGKILLed on an attached cluster, rerun resumes: tests/test_distributed_build.py::test_driver_killed_on_an_attached_cluster_resumes
* MLflow down at start (refused before any work): tests/test_eval_runner.py::test_unreachable_tracking_server_fails_before_any_work
* MLflow killed mid-eval (fails in seconds, names the results):
  tests/test_faults_translation.py::test_tracking_server_dying_mid_eval_fails_fast_naming_the_results
* disk full mid-reconstruct (a 1 MiB tmpfs): tests/test_faults_translation.py::test_reconstruct_into_a_full_disk
* object store unreachable for reconstruct: tests/test_faults_translation.py::test_reconstruct_against_an_unreachable_endpoint
* writing denied (a SeaweedFS identity that may only read): tests/test_s3_access.py::test_build_output_where_writing_is_denied
"""
