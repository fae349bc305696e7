#!/usr/bin/env bash
# The inductive protocol on data/NAME with checkpoint ITER (a number, latest, or all), e.g.
#   bash test_inductive.sh MedicalData 100000
# The architecture comes from the checkpoint; extra flags go to main.py (e.g. --refiner off, --save_maps 8).
exec bash "$(dirname "${BASH_SOURCE[0]}")/test_protocol.sh" inductive "$@"
