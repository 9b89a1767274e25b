//! Plain Kubernetes manifests (YAML or JSON, multi-document) into typed objects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

/// A typed object, shared: a source's cache, the state it publishes and the changes it
/// hands on hold one copy of each object between them (a Pod is 2.4 kB before its
/// containers; a node's agent held three copies of every pod of the cluster).
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    NetworkPolicy(Arc<NetworkPolicy>),
    Service(Arc<Service>),
    /// Nodes: their labels and addresses, for cluster policies' `nodes` peers.
    Node(Arc<Node>),
    /// ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy.
    ClusterPolicy(Arc<super::cluster_policy::ClusterPolicyObject>),
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {index}: {message}")]
    Parse {
        path: PathBuf,
        index: usize,
        message: String,
    },
}

/// The files a path names: itself, or the `.yaml`/`.yml`/`.json` files of a directory
/// (recursively), sorted so that reading is deterministic.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read {
        path: path.into(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|source| ManifestError::Read {
        path: path.into(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| ManifestError::Read {
            path: path.into(),
            source,
        })?;
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            files.extend(manifest_files(&p)?);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses one file's documents. Kinds netpol does not use are skipped; a `List` is
/// unpacked. Errors name the file and the document.
pub fn parse_manifests(path: &Path, text: &str) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(ManifestError::Parse {
                    path: path.into(),
                    index,
                    message: e.to_string(),
                });
                // A syntax error ends the stream: the parser would repeat it forever.
                break;
            }
        };
        if let Err(message) = push_object(value, &mut objects) {
            errors.push(ManifestError::Parse {
                path: path.into(),
                index,
                message,
            });
        }
    }
    (objects, errors)
}

fn push_object(value: serde_yaml::Value, out: &mut Vec<Object>) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let typed = |e: serde_yaml::Error| format!("{kind} {name}: {e}");
    match kind.as_str() {
        "Namespace" => out.push(Object::Namespace(Arc::new(
            serde_yaml::from_value(value).map_err(typed)?,
        ))),
        "Pod" => out.push(Object::Pod(Arc::new(
            serde_yaml::from_value(value).map_err(typed)?,
        ))),
        "NetworkPolicy" => out.push(Object::NetworkPolicy(Arc::new(
            serde_yaml::from_value(value).map_err(typed)?,
        ))),
        "Node" => out.push(Object::Node(Arc::new(
            serde_yaml::from_value(value).map_err(typed)?,
        ))),
        "Service" => out.push(Object::Service(Arc::new(
            serde_yaml::from_value(value).map_err(typed)?,
        ))),
        k if super::cluster_policy::KINDS.contains(&k) => out.push(Object::ClusterPolicy(
            Arc::new(serde_yaml::from_value(value).map_err(typed)?),
        )),
        "List" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    push_object(item, out)?;
                }
            }
        }
        "" => return Err("document has no `kind`".into()),
        _ => {} // other kinds (Deployments, ConfigMaps, ...) are not ours to read
    }
    Ok(())
}

/// What reading manifests gives: the objects, one error per unreadable document, and
/// each file's bytes.
pub type ManifestsRead = (Vec<Object>, Vec<String>, Vec<(PathBuf, Vec<u8>)>);

/// Reads every manifest under `paths` into one list, collecting errors per document.
pub fn read_all(paths: &[PathBuf]) -> ManifestsRead {
    read_all_with(paths, &mut Parsed::default())
}

/// Files parsed before, by path: (digest of the content, objects, errors). A file whose
/// bytes did not change is not parsed again (the watched source re-reads the whole tree
/// per change; parsing a large file dominated the time from a write to enforcement).
#[derive(Default)]
pub struct Parsed {
    files: std::collections::BTreeMap<PathBuf, ParsedFile>,
}

/// (SHA-256 of the content, objects, errors) of one file.
type ParsedFile = ([u8; 32], Vec<Object>, Vec<String>);

/// [`read_all`], parsing only the files whose content differs from `parsed`'s.
pub fn read_all_with(paths: &[PathBuf], parsed: &mut Parsed) -> ManifestsRead {
    let mut seen = std::collections::BTreeMap::new();
    let (objects, errors, contents) = read_files(paths, |file, bytes| {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
        let (objs, errs) = match parsed.files.remove(file) {
            Some((old, objs, errs)) if old == digest => (objs, errs),
            _ => {
                let (objs, errs) = parse_manifests(file, &String::from_utf8_lossy(bytes));
                (objs, errs.into_iter().map(|e| e.to_string()).collect())
            }
        };
        seen.insert(file.to_path_buf(), (digest, objs.clone(), errs.clone()));
        (objs, errs)
    });
    parsed.files = seen;
    (objects, errors, contents)
}

fn read_files(
    paths: &[PathBuf],
    mut parse: impl FnMut(&Path, &[u8]) -> (Vec<Object>, Vec<String>),
) -> ManifestsRead {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let mut contents = Vec::new();
    for root in paths {
        let files = match manifest_files(root) {
            Ok(f) => f,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        for file in files {
            match std::fs::read(&file) {
                Ok(bytes) => {
                    let (objs, errs) = parse(&file, &bytes);
                    objects.extend(objs);
                    errors.extend(errs);
                    contents.push((file, bytes));
                }
                Err(source) => errors.push(ManifestError::Read { path: file, source }.to_string()),
            }
        }
    }
    (objects, errors, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache keeps a file's objects while its bytes are the same, and reads a changed
    /// or new file anew; a removed file's objects go.
    #[test]
    fn only_changed_files_are_parsed_again() {
        let dir = std::env::temp_dir().join(format!("netpol-parsed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ns = |n: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n");
        std::fs::write(dir.join("a.yaml"), ns("a")).unwrap();
        std::fs::write(dir.join("b.yaml"), ns("b")).unwrap();
        let mut parsed = Parsed::default();
        let names = |objs: &[Object]| -> Vec<String> {
            objs.iter()
                .map(|o| match o {
                    Object::Namespace(n) => n.metadata.name.clone().unwrap(),
                    _ => String::new(),
                })
                .collect()
        };
        let (objs, _, _) = read_all_with(std::slice::from_ref(&dir), &mut parsed);
        assert_eq!(names(&objs), ["a", "b"]);
        // Poison the cache entry of a.yaml: kept while the bytes are the same.
        parsed.files.get_mut(&dir.join("a.yaml")).unwrap().1 = vec![];
        let (objs, _, _) = read_all_with(std::slice::from_ref(&dir), &mut parsed);
        assert_eq!(names(&objs), ["b"], "a.yaml was not parsed again");
        std::fs::write(dir.join("a.yaml"), ns("a2")).unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        let (objs, _, _) = read_all_with(std::slice::from_ref(&dir), &mut parsed);
        assert_eq!(names(&objs), ["a2"]);
        assert_eq!(parsed.files.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn multi_document_yaml_and_lists_are_read_and_other_kinds_skipped() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {app: a}}
  spec: {containers: [{name: c, image: i}]}
"#;
        let (objs, errs) = parse_manifests(Path::new("t.yaml"), text);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
        assert!(matches!(objs[1], Object::Pod(_)));
    }

    #[test]
    fn a_bad_document_names_file_and_index_and_keeps_the_rest() {
        let text = "kind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n---\nkind: Namespace\nmetadata: {name: y}\n";
        let (objs, errs) = parse_manifests(Path::new("bad.yaml"), text);
        assert_eq!(objs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.contains("bad.yaml") && msg.contains("document 0") && msg.contains("Pod p"),
            "{msg}"
        );
    }

    #[test]
    fn a_yaml_syntax_error_is_reported_once_and_ends_the_file() {
        let text = "kind: Namespace\nmetadata: {name: x}\n---\nkind: Pod\nmetadata: {name: [\n---\nkind: Namespace\nmetadata: {name: y}\n";
        let (objs, errs) = parse_manifests(Path::new("broken.yaml"), text);
        assert_eq!(objs.len(), 1, "the document before the error is kept");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].to_string().contains("broken.yaml"));
    }
}
