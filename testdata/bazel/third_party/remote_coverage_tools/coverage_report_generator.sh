#!/bin/sh
echo "coverage_report_generator: not available in the offline actiond test workspace" >&2
exit 1
