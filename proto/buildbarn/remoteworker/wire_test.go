package remoteworker_test

import (
	"testing"

	rwpb "github.com/actiond/actiond/proto/buildbarn/remoteworker"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// TestWireNumbers pins the names and field numbers bb_scheduler relies on,
// so a regeneration can never silently break wire compatibility.
func TestWireNumbers(t *testing.T) {
	fd := rwpb.File_buildbarn_remoteworker_remoteworker_proto
	if fd.Package() != "buildbarn.remoteworker" {
		t.Fatalf("package %s", fd.Package())
	}
	svc := fd.Services().ByName("OperationQueue")
	if svc == nil || svc.Methods().ByName("Synchronize") == nil {
		t.Fatal("service OperationQueue.Synchronize missing")
	}
	want := map[protoreflect.FullName]map[string]protoreflect.FieldNumber{
		"buildbarn.remoteworker.SynchronizeRequest": {
			"worker_id": 1, "instance_name_prefix": 2, "platform": 3, "current_state": 4, "size_class": 5, "prefer_being_idle": 6,
		},
		"buildbarn.remoteworker.CurrentState":           {"idle": 1, "executing": 2},
		"buildbarn.remoteworker.CurrentState.Executing": {"action_digest": 1, "started": 2, "fetching_inputs": 3, "running": 4, "uploading_outputs": 5, "completed": 6},
		"buildbarn.remoteworker.SynchronizeResponse":    {"next_synchronization_at": 1, "desired_state": 2},
		"buildbarn.remoteworker.DesiredState":           {"idle": 1, "executing": 2},
		"buildbarn.remoteworker.DesiredState.Executing": {
			"action_digest": 1, "action": 2, "queued_timestamp": 4, "auxiliary_metadata": 6,
			"instance_name_suffix": 7, "w3c_trace_context": 8, "digest_function": 9,
		},
	}
	for name, fields := range want {
		var md protoreflect.MessageDescriptor
		for i := 0; i < fd.Messages().Len() && md == nil; i++ {
			m := fd.Messages().Get(i)
			if m.FullName() == name {
				md = m
			}
			for j := 0; j < m.Messages().Len(); j++ {
				if m.Messages().Get(j).FullName() == name {
					md = m.Messages().Get(j)
				}
			}
		}
		if md == nil {
			t.Errorf("message %s missing", name)
			continue
		}
		if md.Fields().Len() != len(fields) {
			t.Errorf("%s has %d fields, want %d", name, md.Fields().Len(), len(fields))
		}
		for f, n := range fields {
			fdesc := md.Fields().ByName(protoreflect.Name(f))
			if fdesc == nil || fdesc.Number() != n {
				t.Errorf("%s.%s: got %v, want number %d", name, f, fdesc, n)
			}
		}
	}
}
